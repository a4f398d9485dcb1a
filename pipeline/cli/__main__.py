"""`python -m pipeline.cli ...`: the same command as the `imagenet-pipeline` console script."""

from pipeline.cli import main

main()

"""Cluster entrypoint for `imagenet-pipeline train`.

    ray job submit --working-dir . -- python -m jobs.train -c jobs/configs/demo.yaml --set tracking.run_name=r1

Takes exactly the options of `imagenet-pipeline train` (see --help).
"""

import sys

from pipeline.cli import app

if __name__ == "__main__":
    app(["train", *sys.argv[1:]])

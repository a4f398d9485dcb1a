"""Cluster entrypoint for `imagenet-pipeline refit`.

    ray job submit --working-dir . -- python -m jobs.refit --sweep sweep-1 --set scaling.num_workers=8

Takes exactly the options of `imagenet-pipeline refit` (see --help).
"""

import sys

from pipeline.cli import app

if __name__ == "__main__":
    app(["refit", *sys.argv[1:]])

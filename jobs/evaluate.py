r"""Cluster entrypoint for `imagenet-pipeline evaluate`.

    ray job submit --working-dir . -- python -m jobs.evaluate -c jobs/configs/demo.yaml \
        --model models:/demo-resnet18@champion --split test

Takes exactly the options of `imagenet-pipeline evaluate` (see --help).
"""

import sys

from pipeline.cli import app

if __name__ == "__main__":
    app(["evaluate", *sys.argv[1:]])

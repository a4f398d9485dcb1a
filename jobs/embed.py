r"""Cluster entrypoint for `imagenet-pipeline embed` (Ray Data batch inference on the cluster's nodes).

    ray job submit --working-dir . -- python -m jobs.embed -c jobs/configs/demo.yaml \
        --model models:/demo-resnet18@champion --split train

Takes exactly the options of `imagenet-pipeline embed` (see --help).
"""

import sys

from pipeline.cli import app

if __name__ == "__main__":
    app(["embed", *sys.argv[1:]])

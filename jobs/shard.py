"""Cluster entrypoint: shard ImageNet onto storage every node can read.

    ray job submit --working-dir . --entrypoint-num-cpus 8 -- \
        python -m jobs.shard --source /mnt/imagenet --output /mnt/shared/imagenet-shards --processes 8

Takes exactly the options of `imagenet-pipeline shard` (see --help).
"""

import sys

from pipeline.cli import app

if __name__ == "__main__":
    app(["shard", *sys.argv[1:]])

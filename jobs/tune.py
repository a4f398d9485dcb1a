"""Cluster entrypoint for `imagenet-pipeline tune`.

    ray job submit --working-dir . -- python -m jobs.tune \
        -c jobs/configs/demo.yaml -c jobs/configs/demo_sweep.yaml --set tracking.run_name=sweep-1

Takes exactly the options of `imagenet-pipeline tune` (see --help).
"""

import sys

from pipeline.cli import app

if __name__ == "__main__":
    app(["tune", *sys.argv[1:]])

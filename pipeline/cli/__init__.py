"""The `imagenet-pipeline` command: one entry point, one subcommand per job.

    imagenet-pipeline generate --output data/synthetic
    imagenet-pipeline shard --source data/synthetic --output data/shards
    imagenet-pipeline verify data/shards
    imagenet-pipeline load --set data.root=data/shards
    imagenet-pipeline demo

Every subcommand's --help lists its options with defaults. Commands that train or load take the typed
config: YAML files (`--config`, merged left to right) then dotted overrides (`--set optim.lr=0.2`).
Subcommands live by area in this package and register on the shared `app` (pipeline.cli.common).
"""

from __future__ import annotations

from pipeline.cli import bench, data, inference, retrieval, training  # noqa: F401 - each registers its commands on `app`
from pipeline.cli.cluster import cluster_app, job_app
from pipeline.cli.common import app
from pipeline.cli.models import champion_app

app.add_typer(job_app, name="job")
app.add_typer(cluster_app, name="cluster")
app.add_typer(champion_app, name="champion")

__all__ = ["app", "main"]


def main() -> None:
    app()


if __name__ == "__main__":
    main()

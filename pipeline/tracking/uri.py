"""Where MLflow runs go: the tracking URI every process of a job agrees on. No MLflow import, so inference and the
job client can resolve it cheaply.

The driver resolves the URI once and hands it to workers: MLflow's relative `sqlite:///mlflow.db` default would
scatter databases, since Ray workers run in another directory.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from urllib.parse import urlsplit

from pipeline.config import PROJECT_ROOT, Config, refuse_job_copy


def resolve_tracking_uri(config: Config) -> str:
    uri = config.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    uri = pin_sqlite_uri(uri) if uri else f"sqlite:///{PROJECT_ROOT / 'mlflow.db'}"
    if uri.startswith("sqlite:"):
        refuse_job_copy(
            "tracking.tracking_uri",
            uri,
            "that database would vanish with the job; set "
            "MLFLOW_TRACKING_URI on the cluster (an MLflow server) or pass --mlflow-uri to "
            "`imagenet-pipeline job submit`",
        )
    return uri


def pin_sqlite_uri(uri: str) -> str:
    """A relative `sqlite:///mlflow.db` made absolute under the project: Ray workers and jobs run elsewhere."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{(PROJECT_ROOT / uri.removeprefix('sqlite:///')).resolve()}"
    return uri


# MLflow 3.17's UI picks its GenAI or model-training view from this query parameter (else from the browser's
# last choice, GenAI at first), not from the experiment's mlflow.experimentKind tag: links carry it.
TRAINING_VIEW = "workflowType=machine_learning"


def ui_link(server: str, experiment_id: str | None = None, run_id: str | None = None) -> str:
    """The MLflow UI page of an experiment's runs (or of one run), opened on the model-training view."""
    base = redact(server.rstrip("/"))
    if experiment_id is None:
        return f"{base}/#/?{TRAINING_VIEW}"
    page = f"/#/experiments/{experiment_id}" + (f"/runs/{run_id}" if run_id else "")
    return f"{base}{page}?{TRAINING_VIEW}"


def mlflow_ui_command(config: Config, experiment_id: str | None = None) -> str:
    uri = resolve_tracking_uri(config)
    if uri.startswith(("http://", "https://")):
        return f"open {ui_link(uri, experiment_id)}"
    return (
        f".venv/bin/mlflow ui --backend-store-uri {uri} --port 5000   # then open "
        f"{ui_link('http://127.0.0.1:5000', experiment_id)}"
    )


def artifact_root(uri: str) -> str | None:
    """Artifacts beside a SQLite database; a tracking server decides its own."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
    return None


_CREDENTIALS = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/@]*@")
_LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
_warned_plain_http: set[str] = set()


def redact(uri: str | None) -> str | None:
    """`uri` with any `user:password@` replaced by `***@`: safe to print, log and store as an MLflow param."""
    return None if uri is None else _CREDENTIALS.sub(r"\g<scheme>***@", uri)


_CREDENTIALS_ANYWHERE = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]*@")


def redact_text(text: str) -> str:
    """`redact` for URLs anywhere in a text, e.g. a command line's `--set tracking.tracking_uri=https://u:p@host`."""
    return _CREDENTIALS_ANYWHERE.sub(r"\g<scheme>***@", text)


def warn_if_credentials_cross_plain_http(uri: str) -> None:
    """Once per URI: MLflow's basic-auth credentials (in the URI or MLFLOW_TRACKING_USERNAME/PASSWORD/TOKEN) would
    travel unencrypted to a host other than this machine."""
    if not uri.startswith("http://") or uri in _warned_plain_http:
        return
    host = urlsplit(uri).hostname or ""
    has_credentials = bool(_CREDENTIALS.match(uri)) or any(
        os.environ.get(name) for name in ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
    )
    if has_credentials and host not in _LOCAL_HOSTS:
        _warned_plain_http.add(uri)
        logging.getLogger(__name__).warning(
            "MLflow credentials would go to %s over plain http; use https, or reach the server through a "
            "port-forward (`kubectl port-forward svc/mlflow 5000:5000`)",
            redact(uri),
        )

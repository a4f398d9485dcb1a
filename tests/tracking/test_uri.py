"""Credentials in tracking URIs and job addresses are never printed, logged or uploaded."""

import logging

import pytest

from pipeline.config import PROJECT_ROOT, load_config
from pipeline.tracking import uri as tracking_uri

SECRET_URI = "https://alice:hunter2@mlflow.example.com:5000"


def test_redact_hides_user_and_password_and_keeps_the_rest():
    assert tracking_uri.redact(SECRET_URI) == "https://***@mlflow.example.com:5000"
    assert tracking_uri.redact("postgresql://mlflow:pw@db:5432/x") == "postgresql://***@db:5432/x"
    assert tracking_uri.redact("http://mlflow:5000") == "http://mlflow:5000"
    assert tracking_uri.redact(None) is None
    command = "imagenet-pipeline train --set tracking.tracking_uri=https://ada:pw@mlflow:5000 --set data.root=s3://b/x"
    assert tracking_uri.redact_text(command) == (
        "imagenet-pipeline train --set tracking.tracking_uri=https://***@mlflow:5000 --set data.root=s3://b/x"
    )


def test_the_tracking_uri_param_is_logged_redacted():
    from pipeline.tracking.run_config import flatten, loggable

    params = flatten(loggable(load_config(overrides=[f"tracking.tracking_uri={SECRET_URI}"])))
    assert params["tracking.tracking_uri"] == "https://***@mlflow.example.com:5000"
    assert not any("hunter2" in str(value) for value in params.values())


def test_credentials_over_plain_http_to_another_host_warn_once(monkeypatch, caplog):
    monkeypatch.setattr(tracking_uri, "_warned_plain_http", set())
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_TOKEN", raising=False)
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            tracking_uri.warn_if_credentials_cross_plain_http("http://bob:pw@mlflow.internal:5000")
        tracking_uri.warn_if_credentials_cross_plain_http("http://bob:pw@127.0.0.1:5000")  # this machine: fine
        tracking_uri.warn_if_credentials_cross_plain_http("http://mlflow.internal:5001")  # no credentials
    warnings = [record.getMessage() for record in caplog.records]
    assert len(warnings) == 1 and "plain http" in warnings[0] and "pw" not in warnings[0]


def test_a_job_address_never_shows_its_token():
    from pipeline.cluster.jobs import ClusterAddress

    address = ClusterAddress("http://head:8265", token="s3cr3t-token-value")
    assert "s3cr3t" not in repr(address) and "s3cr3t" not in str(address)


@pytest.mark.parametrize("secret", [".env", ".env.production", "deploy.pem", "tls.key", "ray_token", "auth-token.txt"])
def test_secret_files_are_kept_out_of_job_uploads(secret):
    import fnmatch

    patterns = [
        line.strip().rstrip("/")
        for line in (PROJECT_ROOT / ".rayignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert any(fnmatch.fnmatch(secret, pattern) for pattern in patterns)

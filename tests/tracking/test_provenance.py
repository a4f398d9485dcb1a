"""Where a run came from: MLflow's source tags, the Ray job id and the submitter's commit and user."""

from pipeline.config import PROJECT_ROOT
from pipeline.tracking.provenance import (
    GIT_COMMIT_TAG,
    GIT_DIRTY_TAG,
    SOURCE_TYPE_TAG,
    USER_TAG,
    entrypoint_name,
    git_tags,
    job_environment,
    ray_job_tags,
    source_tags,
)


def test_a_ray_job_driver_tags_its_run_with_the_submission_id(monkeypatch):
    monkeypatch.delenv("RAY_JOB_SUBMISSION_ID", raising=False)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert ray_job_tags() == {}
    # What Ray's job supervisor sets for `ray job submit --submission-id nightly-r50`.
    monkeypatch.setenv(
        "RAY_JOB_CONFIG_JSON_ENV_VAR",
        '{"runtime_env": {}, "metadata": {"job_submission_id": "nightly-r50", "job_name": "x"}}',
    )
    assert ray_job_tags() == {"ray.job_id": "nightly-r50"}


def test_a_job_without_git_takes_the_submitters_commit(monkeypatch):
    monkeypatch.setenv("PIPELINE_GIT_COMMIT", "abc123")
    monkeypatch.setenv("PIPELINE_GIT_DIRTY", "true")
    assert git_tags() == {GIT_COMMIT_TAG: "abc123", GIT_DIRTY_TAG: "true"}


def test_the_source_name_is_the_command_or_the_project_script():
    assert entrypoint_name(["/venv/bin/imagenet-pipeline", "tune", "-c", "x.yaml"]) == "imagenet-pipeline tune"
    assert entrypoint_name([str(PROJECT_ROOT / "jobs" / "refit.py"), "--sweep", "s"]) == "jobs/refit.py"


def test_submitted_jobs_carry_the_submitters_user_and_commit(monkeypatch):
    monkeypatch.setenv("PIPELINE_USER", "ada")
    env = job_environment()
    assert env["PIPELINE_USER"] == "ada" and len(env["PIPELINE_GIT_COMMIT"]) == 40
    monkeypatch.setenv("RAY_JOB_SUBMISSION_ID", "raysubmit_1")
    tags = source_tags()
    assert tags[USER_TAG] == "ada" and tags[SOURCE_TYPE_TAG] == "JOB" and tags["ray.job_id"] == "raysubmit_1"

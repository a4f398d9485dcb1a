"""What users see in the MLflow UI, in a real browser: a real `mlflow server`, a tiny training job and a refit
against it, then headless Chromium (Debian's `chromium`, no driver library, no browser download) renders the
pages; the assertions read the rendered page text, and screenshots land in the test's folder."""

import html
import json
import re
import shutil
import subprocess
import urllib.parse
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline.tracking.runs import RUN_NAME_TAG, prepare_tracking
from pipeline.tracking.sweeps import BEST_TRIAL_TAG, SWEEP_TAG
from pipeline.tracking.uri import ui_link
from pipeline.train.driver import run_training
from pipeline.tune.refit import run_refit
from tests.conftest import training_config

pytestmark = [pytest.mark.browser, pytest.mark.ray, pytest.mark.slow]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def render(url: str, screenshot: Path, height: int = 1000) -> str:
    """The page's visible text after its scripts ran (the UI is a single-page app), and a screenshot."""
    if CHROMIUM is None:
        pytest.fail("headless Chromium is missing: `apt-get install -y chromium` (.ci/run installs it)")
    command = [
        CHROMIUM,
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        f"--window-size=1600,{height}",
        "--virtual-time-budget=20000",
        f"--screenshot={screenshot}",
        "--dump-dom",
        url,
    ]
    dom = subprocess.run(command, capture_output=True, timeout=120, check=True, text=True).stdout
    assert screenshot.stat().st_size > 10_000  # a rendered page, not a blank one
    text = re.sub(r"<script.*?</script>|<style.*?</style>|<svg.*?</svg>", " ", dom, flags=re.S)
    text = html.unescape(re.sub(r"<[^>]+>", " ", text)).replace("\xa0", " ")  # "@ champion" has a no-break space
    return re.sub(r"\s+", " ", text), dom


@pytest.fixture
def sweep_and_refit(ray_session, learnable_shards, tmp_path, mlflow_server):
    """A training run that stands as the best trial of a sweep, and the refit of that sweep, both via the server."""
    config = training_config(
        learnable_shards,
        tmp_path,
        "ui-sweep-t1",
        "optim.epochs=2",
        "scaling.num_workers=0",
        f"tracking.tracking_uri={mlflow_server}",
        "tracking.registered_model=ui-model",
        "tracking.experiment=ui-tests",
    )
    uri, experiment_id = prepare_tracking(config)
    client = MlflowClient(uri)
    parent = client.create_run(
        experiment_id, run_name="ui-sweep", tags={RUN_NAME_TAG: "ui-sweep", SWEEP_TAG: "parent", BEST_TRIAL_TAG: "t1"}
    )
    trained = run_training(config)
    client.set_tag(trained.mlflow_run_id, "mlflow.parentRunId", parent.info.run_id)
    client.set_terminated(parent.info.run_id)
    refit = run_refit(config, "ui-sweep")
    return mlflow_server, experiment_id, trained, refit


def test_the_mlflow_ui_shows_runs_charts_datasets_commit_artifacts_and_the_champion(sweep_and_refit, tmp_path):
    server, experiment_id, trained, refit = sweep_and_refit
    client = MlflowClient(server)
    run = client.get_run(trained.mlflow_run_id)
    commit = run.data.tags["mlflow.source.git.commit"]
    digest = next(inp.dataset.digest for inp in run.inputs.dataset_inputs if inp.dataset.name == "train")

    # The experiment opens on its training runs (not on the GenAI overview).
    text, _ = render(ui_link(server, experiment_id), tmp_path / "experiment.png")
    assert "Runs" in text and "Run Name" in text and "ui-sweep" in text and "matching runs" in text
    assert "Traces 0" not in text and "Token Usage" not in text

    # The run: params, the dataset with its manifest digest, the source with its git commit.
    text, _ = render(ui_link(server, experiment_id, trained.mlflow_run_id), tmp_path / "run.png")
    assert "ui-sweep-t1" in text and "Parameters" in text and "optim.lr 0.4" in text
    assert f"train ({digest})" in text and commit[:7] in text
    assert "Parent run ui-sweep" in text

    # The val/top1 chart: MLflow's metric page draws it (plotly renders into an SVG).
    query = {
        "runs": json.dumps([trained.mlflow_run_id]),
        "metric": json.dumps("val/top1"),
        "experiments": json.dumps([experiment_id]),
        "plot_metric_keys": json.dumps(["val/top1"]),
        "plot_layout": "{}",
        "x_axis": "step",
        "y_axis_scale": "linear",
        "line_smoothness": "1",
        "show_point": "true",
        "deselected_curves": "[]",
        "last_linear_y_axis_range": "[]",
    }
    text, dom = render(f"{server}/#/metric?{urllib.parse.urlencode(query)}", tmp_path / "val_top1.png")
    assert "ui-sweep-t1 (val/top1)" in text and "(step=2)" in text and "main-svg" in dom

    # The learning curve among the artifacts.
    text, _ = render(
        ui_link(server, experiment_id, trained.mlflow_run_id).replace("?", "/artifacts?", 1), tmp_path / "artifacts.png"
    )
    assert "learning_curve.png" in text and "config.json" in text

    # The registered model: @champion on the refit's version, which is tagged as a refit.
    text, _ = render(f"{server}/#/models/ui-model", tmp_path / "model.png")
    assert f"Version {refit.model_version}" in text and refit.promoted
    champion_row = text[text.index(f"Version {refit.model_version}") : text.index("Version 1 ")]
    assert "@ champion" in champion_row and "pipeline.refit : true" in champion_row
    assert "Version 1 " in text and "@ champion" not in text[text.index("Version 1 ") :]

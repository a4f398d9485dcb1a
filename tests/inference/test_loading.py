"""Model loading trusts no logged model: only a pt2 model with no code is loaded; a planted pickle model behind
runs:/ or models:/ is refused by predict, evaluate and embed before any of it is deserialised."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import load_config
from pipeline.errors import ModelSourceError
from pipeline.inference.evaluate import evaluate_model
from pipeline.inference.loading import exported_model_metadata, load_model_for_inference
from pipeline.retrieval.embed import embed_split
from tests.conftest import jpeg_bytes

MODEL_NAME = "planted-model"


class _Payload:
    """Unpickling this runs a command: it touches the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _mlmodel(code: str | None = None) -> dict:
    return {
        "flavors": {"pytorch": {"code": code, "model_data": "data", "pytorch_version": str(torch.__version__)}},
        "metadata": {"classes": ["a", "b", "c", "d"], "architecture": "resnet18", "eval_image_size": 32},
    }


def _plant(folder: Path, kind: str, marker: Path) -> Path:
    """A hand-made MLflow PyTorch model folder whose loading would run the payload."""
    data = folder / "data"
    data.mkdir(parents=True)
    mlmodel = _mlmodel()
    if kind == "pickle":  # the reproduction: model.pth + pickle_module_info.txt
        torch.save(_Payload(marker), data / "model.pth")
        (data / "pickle_module_info.txt").write_text("pickle")
    elif kind == "pickle-named-pt2":  # a pickle archive under the pt2 name: MLflow's pt2 check must refuse it
        torch.save({"weights": _Payload(marker)}, data / "model.pt2")
    elif kind == "code":  # a code folder MLflow would put on sys.path
        torch.save({}, data / "model.pt2")
        (folder / "code").mkdir()
        (folder / "code" / "torch_helpers.py").write_text(f"import os\nos.system('touch {marker}')\n")
        mlmodel = _mlmodel(code="code")
    (folder / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    return folder


@pytest.fixture
def planted(tmp_path):
    """A tracking store holding one planted pickle model, reachable as runs:/ and as models:/ (version and
    alias); yields (config, sources, marker)."""
    marker = tmp_path / "payload-ran"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("planted", artifact_location=str(tmp_path / "artifacts"))
    run = client.create_run(experiment).info.run_id
    client.log_artifacts(run, str(_plant(tmp_path / "model", "pickle", marker)), "model")
    client.set_terminated(run)
    client.create_registered_model(MODEL_NAME)
    version = client.create_model_version(MODEL_NAME, f"runs:/{run}/model", run_id=run).version
    client.set_registered_model_alias(MODEL_NAME, "champion", version)
    config = load_config(overrides=[f"tracking.tracking_uri={uri}", f"tracking.registered_model={MODEL_NAME}"])
    sources = [f"runs:/{run}/model", f"models:/{MODEL_NAME}/{version}", f"models:/{MODEL_NAME}@champion"]
    return config, sources, marker


def test_a_planted_pickle_model_is_refused_from_every_source_and_never_runs(planted):
    config, sources, marker = planted
    for source in sources:
        with pytest.raises(ModelSourceError, match="not a torch.export \\(pt2\\) model.*model.pth") as caught:
            load_model_for_inference(source, config)
        assert "\n" not in str(caught.value) and source in str(caught.value)
    assert not marker.exists()


def test_predict_evaluate_and_embed_refuse_it_in_one_line(planted, tiny_shards, tmp_path):
    config, sources, marker = planted
    config = config.model_copy(update={"data": config.data.model_copy(update={"root": str(tiny_shards)})})
    image = tmp_path / "cat.jpg"
    image.write_bytes(jpeg_bytes(0, 0))
    result = CliRunner().invoke(
        app,
        [
            "predict",
            str(image),
            "--model",
            sources[2],
            "--set",
            f"tracking.tracking_uri={config.tracking.tracking_uri}",
        ],
    )
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert result.exit_code == 2 and len(errors) == 1 and "not a torch.export" in errors[0]
    assert "Traceback" not in result.output
    with pytest.raises(ModelSourceError, match="not a torch.export"):
        evaluate_model(config, sources[1], split="val", log_to_mlflow=False)
    with pytest.raises(ModelSourceError, match="not a torch.export"):
        embed_split(config, sources[0], "val", output=str(tmp_path / "gallery"), progress=False)
    assert not marker.exists()


@pytest.mark.parametrize(
    "kind, message",
    [
        ("pickle", "holds model.pth, pickle_module_info.txt, not model.pt2 alone"),
        ("code", "it brings a code folder"),
    ],
)
def test_the_folder_check_reads_only_the_mlmodel_and_the_listing(tmp_path, kind, message):
    marker = tmp_path / "payload-ran"
    folder = _plant(tmp_path / "model", kind, marker)
    with pytest.raises(ModelSourceError, match=message):
        exported_model_metadata(folder, "runs:/abc/model")
    assert not marker.exists()


def test_a_pickle_archive_named_model_pt2_is_refused_by_the_pt2_check_and_never_runs(tmp_path):
    marker = tmp_path / "payload-ran"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("p", artifact_location=str(tmp_path / "a"))).info.run_id
    client.log_artifacts(run, str(_plant(tmp_path / "model", "pickle-named-pt2", marker)), "model")
    config = load_config(overrides=[f"tracking.tracking_uri={uri}"])
    with pytest.raises(ModelSourceError, match="cannot load the pt2 model") as caught:
        load_model_for_inference(f"runs:/{run}/model", config)
    assert "\n" not in str(caught.value)
    assert not marker.exists()
    assert os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] == "false"  # set by importing the pipeline

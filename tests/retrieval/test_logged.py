"""An embed run in MLflow (pipeline/retrieval/logged.py): the gallery index logged and the model version tagged
with it, and downloaded back for `retrieve --index <run id>`; on a SQLite store, and end to end through the CLI on
the shared trained run."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import load_config
from pipeline.data.manifest import read_manifest
from pipeline.errors import DataError
from pipeline.features import store
from pipeline.features.index import INDEX_FILE, IndexSettings, build_index, save_index
from pipeline.retrieval.logged import INDEX_ARTIFACTS, INDEX_RUN_TAG, download_index, log_index
from pipeline.tracking.runs import prepare_tracking
from tests.features.test_store import sample
from tests.retrieval.test_embed import CHAMPION, embed_galleries

GALLERY_FILES = [store.META_FILE, store.LABELS_FILE, store.POSITIONS_FILE, store.KEYS_FILE, INDEX_FILE]


@pytest.fixture
def tracked(tmp_path):
    """A config on a fresh SQLite store, its experiment, and registered model 'm' with version 1."""
    from mlflow.tracking import MlflowClient

    config = load_config(
        overrides=[
            f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            f"retrieval.output={tmp_path / 'cache'}",
            "tracking.experiment=tests",
        ]
    )
    uri, experiment_id = prepare_tracking(config)
    client = MlflowClient(uri)
    client.create_registered_model("m")
    client.create_model_version("m", source=str(tmp_path / "model"))
    return config, uri, experiment_id, client


def written_gallery(folder):
    embeddings = sample(model_source="models:/m/1")
    store.write_embeddings(folder, embeddings)
    save_index(build_index(np.asarray(embeddings.vectors), IndexSettings()), folder / INDEX_FILE)
    return embeddings.meta


def test_an_index_logged_to_a_run_tags_its_model_version_and_downloads_back_once(tracked, tmp_path, monkeypatch):
    import mlflow

    config, uri, experiment_id, client = tracked
    gallery = tmp_path / "gallery" / "val"
    meta = written_gallery(gallery)
    run_id = log_index(config, uri, experiment_id, gallery, meta, images_per_second=12.5)

    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["pipeline.kind"] == "embed"
    assert run.data.params["embed.split"] == "val" and run.data.params["embed.model_source"] == "models:/m/1"
    assert run.data.metrics["embed/images_per_second"] == 12.5
    logged = sorted(item.path.split("/")[-1] for item in client.list_artifacts(run_id, INDEX_ARTIFACTS))
    assert logged == sorted(GALLERY_FILES)  # the vectors live in the index: embeddings.npy is not uploaded
    assert client.get_model_version("m", "1").tags[INDEX_RUN_TAG.format(split="val")] == run_id

    target = download_index(config, run_id)
    assert target == tmp_path / "cache" / "runs" / run_id
    for name in GALLERY_FILES:
        assert (target / name).read_bytes() == (gallery / name).read_bytes()

    def no_network(**kwargs):
        raise AssertionError("downloaded again")

    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", no_network)
    assert download_index(config, run_id) == target


def test_an_unknown_run_or_a_run_without_a_gallery_is_one_line_and_leaves_nothing(tracked, tmp_path):
    config, uri, experiment_id, client = tracked
    unknown = "0123456789abcdef0123456789abcdef"
    with pytest.raises(DataError, match=f"--index {unknown}: no MLflow run with that id in sqlite:///"):
        download_index(config, unknown)
    other = client.create_run(experiment_id).info.run_id
    with pytest.raises(DataError, match=f"--index {other}: the run has no gallery/ artifacts; is it an embed run"):
        download_index(config, other)
    runs = tmp_path / "cache" / "runs"
    assert not runs.exists() or list(runs.iterdir()) == []


@pytest.fixture(scope="module")
def galleries(trained_run):
    return embed_galleries(trained_run)


@pytest.mark.ray
@pytest.mark.slow
def test_retrieve_prints_json_and_draws_a_sheet_from_the_logged_index(trained_run, galleries, tmp_path):
    from mlflow.tracking import MlflowClient

    config, results = galleries
    runner = CliRunner()
    overrides = [
        f"--set=data.root={trained_run.shards}",
        f"--set=tracking.tracking_uri={trained_run.tracking_uri}",
        f"--set=retrieval.output={tmp_path / 'cache'}",
        "--set=tracking.registered_model=test-model",
    ]
    embedded = runner.invoke(
        app, ["embed", "--model", CHAMPION, "--split", "train", "--output", str(results["train"].directory), *overrides]
    )
    assert embedded.exit_code == 0, embedded.output
    assert "reused" in embedded.output
    run_id = embedded.output.strip().split("retrieve --index ")[-1].rstrip(")")
    version = MlflowClient(trained_run.tracking_uri).get_model_version("test-model", "1")
    assert version.tags["retrieval_index_run_train"] == run_id

    queries = tmp_path / "queries"
    queries.mkdir()
    test = store.read_embeddings(results["test"].directory)
    from pipeline.data.shard_reader import read_whole_shard

    manifest = read_manifest(trained_run.shards / "test")
    for position, (image, _label, key) in enumerate(read_whole_shard(str(trained_run.shards / "test"), manifest, 0)):
        if position < 3:
            (queries / f"{key}.jpg").write_bytes(image)
    sheet = tmp_path / "sheet.png"
    answer = runner.invoke(
        app, ["retrieve", str(queries), "--index", run_id, "--top-k", "5", "--json", "--sheet", str(sheet), *overrides]
    )
    assert answer.exit_code == 0, answer.output
    found = json.loads(answer.stdout)
    assert len(found) == 3 and all(len(query["neighbours"]) == 5 for query in found)
    assert set(found[0]["neighbours"][0]) >= {"rank", "key", "label", "class_name", "similarity"}
    assert found[0]["neighbours"][0]["similarity"] >= found[0]["neighbours"][-1]["similarity"]
    shutil.copy(sheet, "/tmp/retrieval_sheet.png")  # for a look by hand; harmless in CI
    with Image.open(sheet) as picture:
        assert picture.format == "PNG" and picture.size[0] > 400
        picture.load()
    assert test.meta.split == "test"

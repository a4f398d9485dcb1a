"""Opening a gallery for `retrieve`: its meta.json never picks the model on its own, and its files (rows, index)
are checked against each other before a query is answered. No Ray, no MLflow: galleries are written by hand."""

import dataclasses
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import load_config
from pipeline.data.synthetic import make_jpeg_bytes
from pipeline.errors import DataError, ModelSourceError
from pipeline.features import store
from pipeline.features.index import INDEX_FILE, IndexSettings, build_index, save_index
from pipeline.retrieval.retrieve import open_gallery
from tests.features.test_store import sample

OURS = "models:/imagenet-classifier/3"  # a pinned version of the default tracking.registered_model
RESNET18_DIM = 512


def gallery_folder(tmp_path, model_source: str = OURS, index_rows=None, seed: int = 0):
    """sample()'s 4 rows (row 2 unreadable) with 512-d vectors and an index over rows 0, 1, 3 (or `index_rows`),
    its sha256 recorded in meta.json as embed records it."""
    embeddings = sample(dim=RESNET18_DIM, model_source=model_source)
    vectors = np.random.default_rng(seed).standard_normal((4, RESNET18_DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    folder = tmp_path / "gallery"
    store.write_embeddings(folder, dataclasses.replace(embeddings, vectors=vectors))
    rows = np.array([0, 1, 3]) if index_rows is None else np.asarray(index_rows)
    sha256 = save_index(build_index(vectors[[min(row, 3) for row in rows]], IndexSettings(), rows), folder / INDEX_FILE)
    store.write_meta(folder, dataclasses.replace(embeddings.meta, index_sha256=sha256))
    return folder


def test_a_gallery_of_the_configured_model_opens_with_its_rows_and_index(tmp_path):
    gallery = open_gallery(str(gallery_folder(tmp_path)), load_config())
    assert gallery.model_source == OURS and gallery.index.ntotal == 3
    assert gallery.labels.tolist() == [0, 1, -1, 0] and gallery.keys == ["k0", "k1", "k2", "k3"]


@pytest.mark.parametrize(
    "source",
    [
        "runs:/0123456789abcdef0123456789abcdef/model",
        "/srv/checkpoints/checkpoint_000009",
        "models:/other-model/3",
        "models:/imagenet-classifier@champion",
        "models:/imagenet-classifier/3/../7",
    ],
)
def test_a_gallery_naming_anything_but_a_version_of_the_configured_model_is_refused_before_reading(tmp_path, source):
    folder = gallery_folder(tmp_path, model_source=source)
    (folder / store.LABELS_FILE).unlink()  # nothing past meta.json may be read: the refusal comes first
    (folder / INDEX_FILE).unlink()
    with pytest.raises(
        ModelSourceError,
        match=r"meta.json: model '.*' is not a version of the registered model "
        r"'imagenet-classifier' \(models:/imagenet-classifier/<version>\); "
        "pass --model naming it",
    ) as caught:
        open_gallery(str(folder), load_config())
    assert "\n" not in str(caught.value)


def test_a_registry_reference_whose_recorded_version_disagrees_is_refused(tmp_path):
    folder = gallery_folder(tmp_path)
    meta = json.loads((folder / store.META_FILE).read_text())
    (folder / store.META_FILE).write_text(json.dumps({**meta, "model_version": "4"}))
    with pytest.raises(ModelSourceError, match="is not a version of the registered model"):
        open_gallery(str(folder), load_config())


def test_a_checkpoint_gallery_is_queried_only_with_that_checkpoint_named(tmp_path):
    checkpoint, other = tmp_path / "checkpoint_000009", tmp_path / "checkpoint_000001"
    checkpoint.mkdir(), other.mkdir()
    folder = gallery_folder(tmp_path, model_source=str(checkpoint.resolve()))
    config = load_config()
    assert open_gallery(str(folder), config, model_source=str(checkpoint)).model_source == str(checkpoint.resolve())
    with pytest.raises(
        ModelSourceError,
        match=rf"--model {other}: the gallery {folder} was embedded with "
        rf"'{checkpoint.resolve()}'; query with that model",
    ):
        open_gallery(str(folder), config, model_source=str(other))
    with pytest.raises(ModelSourceError, match="pass --model naming it"):
        open_gallery(str(folder), config)


@pytest.mark.parametrize(
    ("index_rows", "problem"),
    [
        (
            [0, 1, 4],
            r"the index answers with row 4, which is not one of the gallery's 3 readable rows",
        ),  # past the rows
        ([0, 1, 2], r"the index answers with row 2, which is not one of the gallery's 3 readable rows"),  # label -1
    ],
)
def test_an_index_answering_with_rows_the_gallery_lacks_is_refused(tmp_path, index_rows, problem):
    # meta.json records this index's own sha256: whoever planted it controlled both files
    with pytest.raises(DataError, match=f"index.faiss: {problem}"):
        open_gallery(str(gallery_folder(tmp_path, index_rows=index_rows)), load_config())


def test_an_index_swapped_after_embedding_is_refused_by_its_sha256(tmp_path):
    folder = gallery_folder(tmp_path)
    replacement = build_index(np.eye(3, RESNET18_DIM, dtype=np.float32), IndexSettings(), np.array([0, 1, 3]))
    save_index(replacement, folder / INDEX_FILE)
    with pytest.raises(DataError, match=r"index.faiss: sha256 [0-9a-f]{16}\.\.\., but meta.json records"):
        open_gallery(str(folder), load_config())


def test_the_cli_shows_a_hostile_gallery_as_one_error_line(tmp_path):
    query = tmp_path / "query.jpg"
    query.write_bytes(make_jpeg_bytes(64, 48, seed=1))
    runner = CliRunner()
    hostile = gallery_folder(tmp_path, index_rows=[0, 1, 4])
    planted = runner.invoke(app, ["retrieve", str(query), "--index", str(hostile)])
    assert planted.exit_code == 2, planted.output
    assert planted.output.startswith("error: ") and planted.output.count("\n") == 1
    assert "index.faiss: the index answers with row 4" in planted.output
    elsewhere = runner.invoke(
        app,
        ["retrieve", str(query), "--index", str(gallery_folder(tmp_path / "b", model_source="runs:/0123abcd/model"))],
    )
    assert elsewhere.exit_code == 2 and elsewhere.output.startswith("error: ")
    assert "model 'runs:/0123abcd/model' is not a version of the registered model" in elsewhere.output


def test_queries_are_answered_with_the_galleries_names_and_a_model_of_another_class_count_is_refused(
    tmp_path, monkeypatch
):
    from pipeline.inference.loading import InferenceModel
    from pipeline.retrieval import retrieve as module
    from pipeline.train.models import build_model

    config = load_config(overrides=["model.name=resnet18"])
    loaded = []

    def fake_load(source, config, split=None):  # the gallery's model, built untrained: no registry needed
        loaded.append(source)
        return InferenceModel(build_model(config.model, classes).eval(), ["x"] * classes, "resnet18", 64)

    monkeypatch.setattr(module, "load_model_for_inference", fake_load)
    query = tmp_path / "query.jpg"
    query.write_bytes(make_jpeg_bytes(64, 48, seed=1))
    gallery = open_gallery(str(gallery_folder(tmp_path)), config)
    classes = 2
    [result] = module.retrieve(config, [query], gallery, top_k=5)
    assert loaded == [OURS] and result.predicted in ("a", "b")
    assert sorted(n.row for n in result.neighbours) == [0, 1, 3]  # never the unreadable row 2
    assert {(n.row, n.class_name, n.shard, n.index_in_shard) for n in result.neighbours} == {
        (0, "a", 0, 0),
        (1, "b", 0, 1),
        (3, "a", 1, 0),
    }
    classes = 3
    with pytest.raises(ModelSourceError, match=f"{OURS}: predicts 3 classes, but the gallery .* names 2"):
        module.retrieve(config, [query], gallery)

"""Embedding with Ray Data (pipeline/retrieval/embed.py) on the shared trained run; the index logged to MLflow and
retrieved from the CLI is tested in tests/retrieval/test_logged.py."""

import json
import shutil

import numpy as np
import pytest

from pipeline.config import load_config
from pipeline.data.manifest import file_sha256, read_manifest
from pipeline.errors import ConfigError, DataError, ModelSourceError
from pipeline.features import store
from pipeline.features.index import INDEX_FILE
from pipeline.retrieval.embed import embed_split

pytestmark = [pytest.mark.ray, pytest.mark.slow]
CHAMPION = "models:/test-model@champion"


def with_retrieval(config, tmp_path, **settings):
    retrieval = config.retrieval.model_copy(update={"output": str(tmp_path), **settings})
    return config.model_copy(update={"retrieval": retrieval})


def embed_galleries(trained_run):
    """The champion's train and test embeddings (2 replicas), in the shared run's folder: the first module to ask
    embeds them, a later one (tests/retrieval/test_logged.py) reuses the complete outputs."""
    config = with_retrieval(trained_run.config, trained_run.workdir / "embeddings")
    return config, {split: embed_split(config, CHAMPION, split, progress=False) for split in ("train", "test")}


@pytest.fixture(scope="module")
def galleries(trained_run):
    return embed_galleries(trained_run)


def test_every_sample_is_embedded_exactly_once_in_manifest_order(trained_run, galleries):
    config, results = galleries
    for split, result in results.items():
        manifest = read_manifest(trained_run.shards / split)
        embeddings = store.read_embeddings(result.directory)
        assert embeddings.meta.num_samples == manifest.num_samples and embeddings.meta.unreadable == 0
        assert embeddings.meta.model_source == "models:/test-model/1"  # the alias, pinned
        assert embeddings.meta.shard_counts == manifest.shard_counts
        assert embeddings.meta.index_sha256 == file_sha256(result.directory / INDEX_FILE)
        assert len(set(embeddings.keys)) == manifest.num_samples
        expected = [(shard, index) for shard, count in enumerate(manifest.shard_counts) for index in range(count)]
        assert [tuple(position) for position in embeddings.positions.tolist()] == expected
        assert np.allclose(np.linalg.norm(embeddings.vectors, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("replicas", [1, 3])
def test_any_number_of_replicas_gives_the_same_rows(galleries, tmp_path, replicas):
    config, results = galleries
    # train: 5 shards, enough inputs to keep 3 replicas busy
    again = embed_split(with_retrieval(config, tmp_path, embed_workers=replicas), CHAMPION, "train", progress=False)
    first, second = store.read_embeddings(results["train"].directory), store.read_embeddings(again.directory)
    assert second.keys == first.keys and np.array_equal(second.labels, first.labels)
    assert np.allclose(second.vectors, first.vectors, atol=1e-5)


def test_the_same_inputs_reuse_a_complete_output(galleries):
    config, results = galleries
    again = embed_split(config, CHAMPION, "test", progress=False)
    assert again.reused and again.directory == results["test"].directory


def test_an_output_of_the_format_without_index_checksums_is_embedded_again(galleries, tmp_path):
    config, results = galleries
    older = tmp_path / "older"
    shutil.copytree(results["test"].directory, older)
    meta = json.loads((older / store.META_FILE).read_text())
    del meta["index_sha256"], meta["shard_counts"]
    (older / store.META_FILE).write_text(json.dumps({**meta, "format_version": 1}))
    again = embed_split(config, CHAMPION, "test", output=str(older), progress=False)
    assert not again.reused and store.read_meta(older).index_sha256 == file_sha256(older / INDEX_FILE)


def test_the_trained_features_retrieve_well_above_chance_and_untrained_ones_do_not(trained_run, galleries):
    import torch

    from pipeline.features.quality import knn_top1, nearest, retrieval_metrics

    config, results = galleries
    train, test = (store.read_embeddings(results[split].directory) for split in ("train", "test"))
    trained = retrieval_metrics(torch.from_numpy(np.array(test.vectors)), torch.from_numpy(test.labels))
    neighbours = nearest(torch.from_numpy(np.array(test.vectors)), torch.from_numpy(np.array(train.vectors)), 20)
    knn = knn_top1(neighbours, torch.from_numpy(train.labels), torch.from_numpy(test.labels), 4)
    assert trained["recall_at_1"] > 60 and knn > 60  # 4 classes: chance is 25 %
    # The same architecture untrained: the figures must be able to fail.
    untrained = torch.nn.functional.normalize(
        torch.randn(test.vectors.shape, generator=torch.Generator().manual_seed(0)), dim=1
    )
    assert retrieval_metrics(untrained, torch.from_numpy(test.labels))["map_at_r"] < trained["map_at_r"] - 20


def test_bad_inputs_are_refused_before_any_work(trained_run, galleries, tmp_path):
    from pipeline.retrieval.retrieve import open_gallery, retrieve

    config, results = galleries
    with pytest.raises(DataError, match="no meta.json; not a complete embedding"):
        open_gallery(str(tmp_path), config)
    with pytest.raises(DataError, match="not an embedding folder nor an MLflow run id"):
        open_gallery(str(tmp_path / "never-embedded"), config)
    gallery = open_gallery(str(results["train"].directory), config)
    (tmp_path / "notes.jpg").write_text("not an image")
    with pytest.raises(DataError, match=r"query .*notes.jpg: not a readable image"):
        retrieve(config, [tmp_path / "notes.jpg"], gallery)
    with pytest.raises(ModelSourceError, match="was embedded with 'models:/test-model/1'"):
        open_gallery(str(results["train"].directory), config, model_source=trained_run.outcome.best_checkpoint)
    with pytest.raises(ConfigError, match="split = 'holdout': choose one of"):
        embed_split(config, CHAMPION, "holdout")


def test_a_gallery_inside_a_ray_jobs_copy_of_the_code_is_refused_before_any_work(tiny_shards, tmp_path):
    config = load_config(overrides=[f"data.root={tiny_shards}"])
    inside_job = tmp_path / "session" / "runtime_resources" / "working_dir_files" / "_ray_pkg_1" / "embeddings"
    with pytest.raises(
        ConfigError,
        match=r"--output = '.*working_dir_files.*': the gallery would be deleted with "
        r"the job; this Ray job runs in Ray's copy",
    ) as caught:
        embed_split(config, "runs:/0123abcd/model", "val", output=str(inside_job), progress=False)
    assert "\n" not in str(caught.value) and not inside_job.exists()

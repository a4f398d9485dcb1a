"""A split's shards as an MLflow dataset: name, digest and profile from its manifest, the source from where it
lives (credentials never stored), and the context saying what the run did with it."""

import json

from pipeline.data.manifest import read_manifest
from pipeline.tracking.datasets import split_input


def test_a_local_split_is_a_dataset_named_after_it_with_the_manifests_hash_and_counts(tiny_shards):
    manifest = read_manifest(tiny_shards / "val")
    dataset_input = split_input(manifest, str(tiny_shards / "val"), context="train")
    dataset = dataset_input.dataset
    assert dataset.name == "val" and dataset.digest == manifest.content_hash()
    assert json.loads(dataset.profile) == {"num_samples": 22, "num_classes": 4, "num_shards": 3}
    assert str(tiny_shards / "val") in dataset.source
    assert [(tag.key, tag.value) for tag in dataset_input.tags] == [("mlflow.data.context", "train")]


def test_a_url_source_keeps_no_credentials_and_an_unknown_scheme_is_an_external_source(tiny_shards):
    manifest = read_manifest(tiny_shards / "test")
    for location in ("https://alice:hunter2@data.example.com/test", "weird://alice:hunter2@bucket/test"):
        dataset = split_input(manifest, location, context="test").dataset
        assert "hunter2" not in dataset.source and "***@" in dataset.source
    assert dataset.source_type == "external"
    assert json.loads(dataset.source) == {"uri": "weird://***@bucket/test"}

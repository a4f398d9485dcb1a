"""Checkpoint contents and where they are read from: local disk, NFS, or a storage URI."""

from __future__ import annotations

import pytest
import torch

from pipeline.train.checkpoints import STATE_FILE, TrainingState, load_weights, local_checkpoint, read_meta, save_checkpoint


def write_checkpoint(directory, seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1)
    directory.mkdir(parents=True)
    save_checkpoint(directory, model=model, optimizer=optimizer, scheduler=scheduler, scaler=None,
                    state=TrainingState(epoch=2), meta={"model": "linear", "num_classes": 2})
    return model


def test_a_local_checkpoint_directory_is_used_in_place(tmp_path):
    model = write_checkpoint(tmp_path / "checkpoint_000001")
    with local_checkpoint(str(tmp_path / "checkpoint_000001"), storage_path=str(tmp_path)) as directory:
        assert directory == tmp_path / "checkpoint_000001"
        restored = load_weights(directory, torch.nn.Linear(3, 2))
    assert torch.equal(restored.weight, model.weight)


def test_a_checkpoint_uri_is_read_through_rays_filesystem_layer(tmp_path):
    model = write_checkpoint(tmp_path / "run" / "checkpoint_000002", seed=1)
    uri = f"file://{tmp_path}/run/checkpoint_000002"  # what s3:// and gs:// go through, minus the network
    with local_checkpoint(uri, storage_path=f"file://{tmp_path}") as directory:
        assert (directory / STATE_FILE).is_file() and read_meta(directory)["num_classes"] == 2
        restored = load_weights(directory, torch.nn.Linear(3, 2))
    assert torch.equal(restored.weight, model.weight)


def test_a_missing_local_checkpoint_names_the_path(tmp_path):
    with pytest.raises(ValueError, match="checkpoint_000009': no such directory"):
        with local_checkpoint(str(tmp_path / "checkpoint_000009"), storage_path=str(tmp_path)):
            pass


def test_a_path_ray_reported_for_uri_storage_gets_the_storages_scheme():
    from pipeline.train.checkpoints import checkpoint_uri

    assert checkpoint_uri("bucket/run/checkpoint_1", "s3://bucket/results") == "s3://bucket/run/checkpoint_1"
    assert checkpoint_uri("/mnt/x/run/checkpoint_1", "file:///mnt/x") == "file:///mnt/x/run/checkpoint_1"
    assert checkpoint_uri("gs://b/run/checkpoint_1", "gs://b") == "gs://b/run/checkpoint_1"
    assert checkpoint_uri("/nfs/run/checkpoint_1", "/nfs") == "/nfs/run/checkpoint_1"


@pytest.mark.parametrize("as_url", [False, True], ids=["local", "file-url"])
def test_the_latest_checkpoint_of_a_run_is_found_on_any_storage(tmp_path, as_url):
    from pipeline.train.checkpoints import latest_run_checkpoint

    storage = f"file://{tmp_path}" if as_url else str(tmp_path)
    assert latest_run_checkpoint(storage, "r1") is None
    for stamp in ("2026-11-30_05-36-54.789035", "2026-11-30_05-37-03.304209", "2026-11-30_05-36-59.000001"):
        write_checkpoint(tmp_path / "r1" / f"checkpoint_{stamp}")
    latest = latest_run_checkpoint(storage, "r1")
    assert latest == f"{storage}/r1/checkpoint_2026-11-30_05-37-03.304209"  # Ray names them by time
    assert read_meta(latest)["model"] == "linear"


def test_a_resume_of_another_architecture_is_refused_on_uri_storage_too(tmp_path, tiny_shards):
    from pipeline.config import ConfigError, load_config
    from pipeline.data.manifest import read_manifest
    from pipeline.train.driver import check_resume_compatible

    write_checkpoint(tmp_path / "r2" / "checkpoint_2026-11-30_05-36-54.789035")  # meta: model "linear"
    config = load_config(overrides=[f"data.root={tiny_shards}"])
    with pytest.raises(ConfigError, match="holds a linear checkpoint with 2 classes, but the config asks for resnet18"):
        check_resume_compatible(f"file://{tmp_path}", "r2", config, read_manifest(tiny_shards / "train"))


class _Payload:
    """What an attacker with write access to checkpoint storage would plant: code that runs when unpickled."""

    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (self.marker,))


@pytest.mark.parametrize("reader", ["read_state", "load_weights", "load_checkpoint"])
def test_a_checkpoint_with_a_pickle_payload_is_refused_and_the_payload_never_runs(tmp_path, reader):
    from pipeline.train import checkpoints

    write_checkpoint(tmp_path / "ckpt")
    marker = tmp_path / "payload-ran"
    payload = torch.load(tmp_path / "ckpt" / STATE_FILE, weights_only=True)
    payload["training_state"]["history"] = [_Payload(marker)]
    torch.save(payload, tmp_path / "ckpt" / STATE_FILE)
    calls = {"read_state": lambda: checkpoints.read_state(tmp_path / "ckpt"),
             "load_weights": lambda: checkpoints.load_weights(tmp_path / "ckpt", torch.nn.Linear(3, 2)),
             "load_checkpoint": lambda: checkpoints.load_checkpoint(tmp_path / "ckpt", model=torch.nn.Linear(3, 2))}
    with pytest.raises(checkpoints.CheckpointError, match="refused: it needs full unpickling.*can run code"):
        calls[reader]()
    assert not marker.exists()


def test_every_rng_stream_round_trips_through_a_weights_only_checkpoint(tmp_path):
    import random

    import numpy as np

    from pipeline.train.checkpoints import load_checkpoint

    write_checkpoint(tmp_path / "ckpt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(123), np.random.seed(123), torch.manual_seed(123)  # disturb every stream
    load_checkpoint(tmp_path / "ckpt", model=torch.nn.Linear(3, 2))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected

"""Checkpoint contents and where they are read from: local disk, NFS, or a storage URI."""

from __future__ import annotations

import pytest
import torch

from pipeline.checkpoints import STATE_FILE, TrainingState, load_weights, local_checkpoint, read_meta, save_checkpoint


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


def test_a_path_ray_reported_for_uri_storage_gets_the_storages_scheme(tmp_path):
    model = write_checkpoint(tmp_path / "run" / "checkpoint_000003", seed=2)
    # Ray reports checkpoints on s3://bucket/... as "bucket/..."; on file:// storage as "/abs/...".
    with local_checkpoint(str(tmp_path / "run" / "checkpoint_000003"), storage_path=f"file://{tmp_path}") as directory:
        restored = load_weights(directory, torch.nn.Linear(3, 2))
    assert torch.equal(restored.weight, model.weight)

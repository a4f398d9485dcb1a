"""`make demo`'s data steps (pipeline/demo/local.py) at test size: generated, sharded and verified once, kept on a
rerun, and a damaged shard stops the demo before Ray starts. Training itself is tested in tests/train/."""

from __future__ import annotations

import pytest

from pipeline.config import PROJECT_ROOT, load_config
from pipeline.demo import local


@pytest.fixture
def small_demo(monkeypatch, tmp_path):
    """The demo's own steps and config, with 2 classes of a few 48x36 images (the demo's sizes take minutes), in
    this process (a pool of 2 would spend seconds importing torch)."""
    from pipeline.data import sharding, synthetic

    for module, name in [(synthetic, "generate_imagenet_folder"), (sharding, "shard_imagenet")]:
        step = getattr(module, name)
        monkeypatch.setattr(
            module, name, lambda *args, _step=step, **kwargs: _step(*args, **{**kwargs, "processes": 1})
        )
    for name, value in [
        ("DEMO_CLASSES", 2),
        ("DEMO_TRAIN_PER_CLASS", 6),
        ("DEMO_TEST_PER_CLASS", 2),
        ("DEMO_VAL_PER_CLASS", 2),
        ("DEMO_IMAGE_SIZE", (48, 36)),
    ]:
        monkeypatch.setattr(local, name, value)
    config = load_config([PROJECT_ROOT / "jobs" / "configs" / "demo.yaml"], [f"data.root={tmp_path / 'shards'}"])
    return config, tmp_path


def test_the_data_steps_verify_and_a_rerun_keeps_what_is_complete(small_demo, capsys):
    config, data_dir = small_demo
    assert local.prepare_demo_data(config, data_dir)
    first = capsys.readouterr().out
    assert "wrote 2 classes" in first and "train: ok" in first and "test: ok" in first
    shards = sorted((data_dir / "shards").rglob("*.tar"))
    stamps = [shard.stat().st_mtime_ns for shard in shards]

    assert local.prepare_demo_data(config, data_dir)
    again = capsys.readouterr().out
    assert f"{data_dir / 'source'} exists, kept" in again and f"{data_dir / 'shards'} complete, kept" in again
    assert [shard.stat().st_mtime_ns for shard in shards] == stamps


def test_a_damaged_shard_fails_the_demo_before_training(small_demo, capsys, monkeypatch):
    import pipeline.cluster.session as session

    config, data_dir = small_demo
    assert local.prepare_demo_data(config, data_dir)
    victim = sorted((data_dir / "shards" / "train").glob("*.tar"))[0]
    victim.write_bytes(victim.read_bytes()[:-2000])

    def never():
        raise AssertionError("Ray started for shards that did not verify")

    monkeypatch.setattr(session, "ensure_ray", never)
    assert local.run_demo(config, data_dir) is False
    output = capsys.readouterr().out
    assert victim.name in output and output.rstrip().endswith("demo FAILED: the shards did not verify")

"""The overhead benchmark's parts: inputs are checked before any work, and the steady-state figure is computed as
documented (the torchrun DDP reference it runs is tested in tests/bench/test_ddp_reference.py). No timing is
asserted (this is not a speed test); the full benchmark starts Ray several times and runs for minutes, so it is
run by hand (`imagenet-pipeline bench-train --only overhead`).
"""

from __future__ import annotations

import pytest

from pipeline.bench.overhead import run_overhead_benchmark, steady_state


@pytest.mark.parametrize(
    ("arguments", "named"),
    [
        ({"model": "vgg16"}, "model = 'vgg16'"),
        ({"image_size": 8}, "image_size = 8"),
        ({"model": "alexnet", "image_size": 32}, "image_size = 32: alexnet needs at least 63"),
        ({"global_batch": 31}, "global_batch = 31 is not divisible by num_workers = 2"),
        ({"global_batch": 0}, "global_batch = 0"),
        ({"num_workers": 0}, "num_workers = 0"),
        ({"train_images": 16}, "train_images = 16 must be at least global_batch = 32"),
        ({"loader_workers": -1}, "loader_workers = -1"),
        ({"rounds": 0}, "rounds = 0"),
        ({"rounds": 2}, "--rounds 2: at least 3 interleaved rounds"),
        ({"epochs": 2, "warmup_epochs": 2}, "warmup_epochs = 2 must be >= 0 and below epochs = 2"),
    ],
)
def test_overhead_benchmark_rejects_bad_arguments_before_any_work(arguments, named, tmp_path):
    with pytest.raises(ValueError, match=named):
        run_overhead_benchmark(tmp_path / "work", **arguments)
    assert not (tmp_path / "work").exists()


def test_the_steady_state_length_is_counted_per_run():
    from pipeline.bench.overhead import side_steady_seconds

    assert side_steady_seconds({"epoch_images_per_second": [50.0, 100.0, 200.0]}, 1, 2000) == pytest.approx(30.0)


def test_steady_state_drops_warmup_epochs_and_weights_epochs_by_time():
    assert steady_state([5.0, 20.0, 20.0], warmup_epochs=1) == pytest.approx(20.0)
    # Equal images per epoch: 10 and 30 images/s take 3 and 1 time units for 30 images each, 60 / 4 = 15.
    assert steady_state([99.0, 10.0, 30.0], warmup_epochs=1) == pytest.approx(15.0)
    with pytest.raises(ValueError, match="warmup_epochs = 2 leaves none of 2 epochs"):
        steady_state([1.0, 2.0], warmup_epochs=2)

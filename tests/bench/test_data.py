"""The data benchmark runs end to end on a dozen images; no timing is asserted (this is not a speed test)."""

from __future__ import annotations

from pathlib import Path

import pytest
from torchvision import datasets

from pipeline.bench.data import (
    measure_train_transform,
    read_shard_images,
    run_data_benchmark,
    write_benchmark_shards,
)

# torchvision 0.29 deprecates its image decoders on every call; pipeline.data.transforms explains why it uses one.
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[dict, Path]:
    work_dir = tmp_path_factory.mktemp("bench_data")
    return run_data_benchmark(work_dir, num_images=12, image_size=48, repeats=1, reduced_image_sizes=(32,)), work_dir


def test_tiny_run_reports_positive_figures_for_both_paths_on_the_same_images(tiny_run):
    result, _ = tiny_run
    assert result["num_images"] == 12
    assert result["mean_jpeg_kilobytes"] > 10  # photo-like 500x375 files, not flat colour
    assert list(result["by_image_size"]) == [48, 32]
    for figures in result["by_image_size"].values():
        assert figures["reference"]["images"] == figures["ours"]["images"] == 12
        assert figures["ours_transform_only"]["images"] == 12
        assert figures["reference_images_per_second_per_core"] > 0
        assert figures["ours_images_per_second_per_core"] > 0
        assert figures["speedup"] == pytest.approx(
            figures["ours_images_per_second_per_core"] / figures["reference_images_per_second_per_core"]
        )


def test_a_run_prints_one_table_row_per_distinct_size(tmp_path, capsys):
    run_data_benchmark(tmp_path, num_images=8, image_size=40, repeats=1, reduced_image_sizes=(40, 24))
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.endswith("x")]
    assert [row[0] for row in rows] == ["40", "24"]  # the repeated 40 is measured once
    assert all(float(value) > 0 for row in rows for value in row[1:4])


def test_shards_hold_exactly_the_image_folder_bytes_in_order(tiny_run, tmp_path):
    _, work_dir = tiny_run
    image_folder = work_dir / "jpeg_folder"
    shards = write_benchmark_shards(image_folder, tmp_path / "shards", num_images=12)
    expected = [Path(path).read_bytes() for path, _ in datasets.ImageFolder(str(image_folder / "train")).samples[:12]]
    assert list(read_shard_images(shards)) == expected


def test_measure_train_transform_takes_any_iterable_of_bytes(tiny_run):
    _, work_dir = tiny_run
    paths = sorted((work_dir / "jpeg_folder" / "train").rglob("*.JPEG"))[:5]
    throughput = measure_train_transform((path.read_bytes() for path in paths), image_size=24)
    assert throughput.images == 5
    assert throughput.cpu_seconds > 0 and throughput.images_per_second_per_core > 0


@pytest.mark.parametrize("argument", ["num_images", "image_size", "repeats"])
def test_invalid_arguments_raise_value_error(argument, tmp_path):
    with pytest.raises(ValueError, match=argument):
        run_data_benchmark(tmp_path, **{argument: 0})

"""bench-gpu end to end on the CPU (its smoke mode): every feed runs through the real step and loader, the
table and JSON come out, and the module needs neither Ray nor MLflow (the GPU box has neither)."""

import json
import subprocess
import sys

import pytest

from pipeline.bench.gpu import run_gpu_benchmark
from pipeline.config import PROJECT_ROOT


@pytest.mark.slow
def test_the_smoke_run_measures_every_feed_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    figures = run_gpu_benchmark(tmp_path / "work", "cpu", True, ("resnet18",), (0, 1), False, out)
    # The most telling figures first (a cut-short GPU run keeps them): GPU decoding, then CPU, most processes first.
    assert [f.feed for f in figures] == [
        "synthetic",
        "gpu decode, 1 loader processes",
        "cpu decode, 1 loader processes",
        "cpu decode, 0 loader processes",
    ]
    assert all(f.images_per_second > 0 and 0.0 <= f.data_wait_share <= 1.0 for f in figures)
    assert figures[0].share_of_ceiling is None and all(f.share_of_ceiling > 0 for f in figures[1:])
    assert not list(tmp_path.glob("*.partial"))  # rewritten after each figure, atomically
    written = json.loads(out.read_text())
    assert written["device"].startswith("CPU") and len(written["figures"]) == 4
    table = capsys.readouterr().out
    assert "bench-gpu on CPU" in table and "gpu decode, 1 loader processes" in table


def test_the_benchmark_imports_neither_ray_nor_mlflow():
    probe = "import sys, pipeline.bench.gpu; print(sorted(m for m in ('ray', 'mlflow', 'typer') if m in sys.modules))"
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120, check=True
    )
    assert result.stdout.strip() == "[]"


@pytest.mark.slow
def test_the_decode_breakdown_times_every_part_of_one_batch(tmp_path, capsys):
    from pipeline.bench.gpu import decode_breakdown

    timings = decode_breakdown(tmp_path, "cpu", smoke=True, rounds=1)
    assert set(timings) == {
        "nvjpeg batched",
        "nvjpeg one by one",
        "device route (decode, crop, resize)",
        "cpu route, one process",
        "crops and resizes (route minus batched decode)",
    }
    assert all(timings[label] > 0 for label in timings if not label.startswith("crops"))
    assert "decode breakdown, one batch of 8 80x64 JPEGs" in capsys.readouterr().out

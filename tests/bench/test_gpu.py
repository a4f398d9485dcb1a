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
    assert [f.feed for f in figures] == ["synthetic", "cpu decode, 0 loader processes",
                                         "cpu decode, 1 loader processes", "gpu decode, 1 loader processes"]
    assert all(f.images_per_second > 0 and 0.0 <= f.data_wait_share <= 1.0 for f in figures)
    assert figures[0].share_of_ceiling is None and figures[1].share_of_ceiling > 0
    written = json.loads(out.read_text())
    assert written["device"].startswith("CPU") and len(written["figures"]) == 4
    table = capsys.readouterr().out
    assert "bench-gpu on CPU" in table and "gpu decode, 1 loader processes" in table


def test_the_benchmark_imports_neither_ray_nor_mlflow():
    probe = ("import sys, pipeline.bench.gpu; "
             "print(sorted(m for m in ('ray', 'mlflow', 'typer') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], cwd=PROJECT_ROOT, capture_output=True, text=True,
                            timeout=120, check=True)
    assert result.stdout.strip() == "[]"

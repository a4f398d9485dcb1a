"""bench-plan: the simulated read cost of the loader's own plans, with and without sample indexes."""

import json

import pytest
from typer.testing import CliRunner

from pipeline.bench.plan import measure, read_ratios, run_plan_benchmark, shard_counts
from pipeline.cli import app
from pipeline.data.plan import Segment, WorkerPlan


def test_a_segment_read_without_an_index_costs_everything_before_its_end():
    plans = [WorkerPlan(segments=(Segment(0, 600, 1000), Segment(1, 0, 200)), num_padding=0, batch_sizes=(600,))]
    assert read_ratios(plans) == (1200 / 600, 1.0)  # 1000 + 200 read for 400 + 200 planned


def test_imagenet_1k_at_8_ranks_reads_val_114_percent_of_its_bytes_without_an_index():
    assert shard_counts(1_281_167)[-1] == 167 and len(shard_counts(1_281_167)) == 1282
    figure = measure("imagenet-1k", 8, 2)
    assert figure.val_read_ratio_sequential == pytest.approx(1.142, abs=1e-3)
    assert figure.val_read_ratio_indexed == figure.train_read_ratio_indexed == 1.0
    assert 1.0 < figure.train_read_ratio_sequential < 1.01 and figure.plan_ms_per_rank > 0


def test_the_command_prints_the_table_and_writes_json(tmp_path):
    out = tmp_path / "plan.json"
    result = CliRunner().invoke(
        app, ["bench-plan", "--datasets", "imagenet-1k", "--worlds", "8", "--loaders", "2", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "imagenet-1k train manifest:" in result.output
    written = json.loads(out.read_text())
    assert len(written["figures"]) == 1 and written["manifests"]["imagenet-1k"]["bytes"] > 0


def test_run_plan_benchmark_returns_a_figure_per_combination():
    figures = run_plan_benchmark(("imagenet-1k",), (8,), (2, 8))
    assert [(f.world_size, f.loaders) for f in figures] == [(8, 2), (8, 8)]

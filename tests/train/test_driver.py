"""Real 2-worker Ray Train runs: learning, resume, a killed worker, and every bad input refused up front."""

import json
import os
import signal
import threading
import time
from collections import Counter

import psutil
import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline import metrics as m
from pipeline.config import ConfigError
from pipeline.tracking.runs import RUN_NAME_TAG
from pipeline.train.driver import run_training
from tests.conftest import training_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _runs_named(config, run_name):
    client = MlflowClient(config.tracking.tracking_uri)
    experiment = client.get_experiment_by_name(config.tracking.experiment)
    return client.search_runs([experiment.experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'")


def _metric_steps(config, run_id, key):
    return [point.step for point in MlflowClient(config.tracking.tracking_uri).get_metric_history(run_id, key)]


def test_two_workers_learn_loss_falls_and_val_top1_beats_chance(trained_run):
    history = trained_run.outcome.history
    assert [row[m.EPOCH] for row in history] == [1, 2, 3]
    assert history[-1][m.TRAIN_LOSS] < history[0][m.TRAIN_LOSS]
    assert trained_run.outcome.best_metrics[m.VAL_TOP1] > 50.0  # 4 classes: chance is 25 %
    assert all(row[m.TRAIN_CORRUPT_SAMPLES] == 0 for row in history)
    # tracking.knn_every = 3: the distributed k-NN (each rank a share of the train gallery) ran at epoch 3 only.
    assert [m.VAL_KNN_TOP1 in row for row in history] == [False, False, True]
    assert history[-1][m.VAL_KNN_TOP1] > 50.0
    logged = MlflowClient(trained_run.tracking_uri).get_run(trained_run.outcome.mlflow_run_id).data.metrics
    assert logged[m.VAL_KNN_TOP1] == pytest.approx(history[-1][m.VAL_KNN_TOP1])


def test_rerun_with_the_same_name_resumes_and_keeps_one_mlflow_run(ray_session, learnable_shards, tmp_path):
    # One worker: resuming is the driver's and Ray Train's business, the same at any world size (the exact
    # multi-rank resume is tested with per-rank streams in tests/train/test_checkpoints.py).
    first = run_training(
        training_config(learnable_shards, tmp_path, "resume-me", "optim.epochs=2", "scaling.num_workers=1")
    )
    assert [row[m.EPOCH] for row in first.history] == [1, 2]
    config = training_config(learnable_shards, tmp_path, "resume-me", "optim.epochs=3", "scaling.num_workers=1")
    second = run_training(config)
    assert [row[m.EPOCH] for row in second.history] == [1, 2, 3]
    assert second.history[:2] == first.history  # the first two epochs came from the checkpoint, not a rerun
    (run,) = _runs_named(config, "resume-me")
    assert run.info.run_id == first.mlflow_run_id == second.mlflow_run_id
    assert _metric_steps(config, run.info.run_id, m.VAL_TOP1) == [1, 2, 3]


def _kill_a_worker_within_epoch_2(run_dir, killed: list) -> None:
    """SIGKILL one Ray Train worker once Ray has registered a checkpoint taken within epoch 2 as its latest (a
    checkpoint merely on disk may still be unregistered: a restart would then resume from an older one)."""
    deadline = time.time() + 240
    while time.time() < deadline:
        try:
            latest = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())["latest_checkpoint_result"]
        except (OSError, ValueError, KeyError):
            latest = None  # not written yet, or being replaced
        metrics = (latest or {}).get("metrics", {})
        if metrics.get(m.EPOCH) == 1 and metrics.get(m.STEP_IN_EPOCH):
            for process in psutil.process_iter(["cmdline"]):
                if any("RayTrainWorker" in part for part in (process.info["cmdline"] or [])):
                    os.kill(process.pid, signal.SIGKILL)
                    killed.append(process.pid)
                    return
        time.sleep(0.05)


def _planned_keys(shards, epoch, world, batch, seed):
    """The sample keys the plan gives all ranks in `epoch`, read from the shards in file order."""
    from pipeline.data.manifest import read_manifest
    from pipeline.data.plan import plan_train_worker
    from pipeline.data.shard_reader import read_whole_shard

    manifest = read_manifest(shards / "train")
    keys = [
        [key for _, _, key in read_whole_shard(str(shards / "train"), manifest, shard)]
        for shard in range(len(manifest.shards))
    ]
    planned = Counter()
    for rank in range(world):
        plan = plan_train_worker(
            manifest.shard_counts, world_size=world, rank=rank, batch_size=batch, seed=seed, epoch=epoch
        )
        planned.update(key for segment in plan.segments for key in keys[segment.shard][segment.start : segment.stop])
    return planned


def test_a_worker_sigkilled_within_an_epoch_resumes_at_its_next_step_on_the_planned_samples(
    ray_session, learnable_shards, tmp_path, trained_run, monkeypatch
):
    """tracking.checkpoint_every_steps on 2 workers: a worker SIGKILLed after a checkpoint within epoch 2; the run
    resumes at the next step of epoch 2 (not its start), epoch 2 trains every planned sample once across both
    attempts (the sample log's keys), and the final weights equal those of `trained_run`, the same run
    uninterrupted (the loader and the gloo reductions are deterministic)."""
    from pipeline.train.checkpoints import latest_run_checkpoint, read_state

    monkeypatch.setenv("PIPELINE_SAMPLE_LOG", str(tmp_path / "samples.jsonl"))
    config = training_config(learnable_shards, tmp_path, "kill-me", "tracking.checkpoint_every_steps=2")
    killed: list[int] = []
    killer = threading.Thread(target=_kill_a_worker_within_epoch_2, args=(tmp_path / "ray" / "kill-me", killed))
    killer.start()
    outcome = run_training(config)
    killer.join()
    assert killed, "no Ray Train worker process was found to kill"
    assert [row[m.EPOCH] for row in outcome.history] == [1, 2, 3]
    runs = _runs_named(config, "kill-me")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert _metric_steps(config, runs[0].info.run_id, m.VAL_TOP1) == [1, 2, 3]  # each epoch once, none lost
    steps = _metric_steps(config, runs[0].info.run_id, m.STEP_LOSS)
    assert len(steps) == len(set(steps))  # the resumed attempt logged no step twice

    rows = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    rank0 = [(row["epoch"], row["step"]) for row in rows if row["rank"] == 0]
    restart = next(i for i in range(1, len(rank0)) if rank0[i] <= rank0[i - 1])
    assert rank0[restart][0] == 1 and rank0[restart][1] > 0, f"resumed at {rank0[restart]}, not within epoch 2"
    by_step: dict = {}
    for row in rows:
        if row["epoch"] == 1:
            assert by_step.setdefault((row["rank"], row["step"]), row["keys"]) == row["keys"]  # a replay, same keys
    assert sorted(by_step) == [(rank, step) for rank in (0, 1) for step in range(5)]
    seen = Counter(key for keys in by_step.values() for key in keys)
    assert seen == _planned_keys(learnable_shards, 1, world=2, batch=8, seed=config.seed)

    def final_weights(storage, name):
        return read_state(latest_run_checkpoint(storage, name))["model"]

    expected = final_weights(str(trained_run.workdir / "ray"), trained_run.outcome.run_name)
    got = final_weights(str(tmp_path / "ray"), "kill-me")
    assert all(torch.equal(expected[key], got[key]) for key in expected)


def _checkpoint_files(run):
    root = run.workdir / "ray" / run.outcome.run_name
    return sorted((p, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file())


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.name=resnet34"], r"holds a resnet18 checkpoint with 4 classes, but the config asks for resnet34"),
        (["model.num_classes=7"], r"model\.num_classes = 7: the shards in .* have 4 classes"),
        (["tracking.tracking_uri=http://127.0.0.1:9"], r"MLflow server not reachable"),
        (["tracking.storage_path=/etc/hostname/ray"], r"tracking\.storage_path = '/etc/hostname/ray': cannot write"),
    ],
    ids=["other-architecture", "class-count", "tracking-server", "storage-path"],
)
def test_bad_inputs_fail_before_training_and_overwrite_nothing(trained_run, overrides, message):
    before = _checkpoint_files(trained_run)
    config = training_config(trained_run.shards, trained_run.workdir, trained_run.outcome.run_name, *overrides)
    with pytest.raises(ConfigError, match=message):
        run_training(config)
    assert _checkpoint_files(trained_run) == before


def test_missing_shards_fail_before_training(tmp_path):
    config = training_config(tmp_path / "no-shards", tmp_path, "x")
    with pytest.raises(ConfigError, match="directory does not exist"):
        run_training(config)


def test_a_resume_with_other_data_or_optimisation_is_refused_unless_allowed(tiny_shards, tmp_path):
    import json

    import pytest

    from pipeline.config import load_config
    from pipeline.data.manifest import read_manifest
    from pipeline.errors import ConfigError
    from pipeline.train.driver import check_resume_compatible

    base = [f"data.root={tiny_shards}", "model.name=resnet18", "optim.lr=0.1", "optim.batch_size=16"]
    config = load_config(overrides=base)
    manifest = read_manifest(tiny_shards / "train")
    checkpoint = tmp_path / "run" / "checkpoint_2026-12-01_00-00-00"
    checkpoint.mkdir(parents=True)
    (checkpoint / "meta.json").write_text(
        json.dumps(
            {
                "model": "resnet18",
                "num_classes": manifest.num_classes,
                "manifest_hash": "0123456789abcdef",
                "config": config.model_dump(mode="json")
                | {"optim": {**config.optim.model_dump(mode="json"), "lr": 0.2}},
            }
        )
    )
    progress = {"epoch": 1, "step_in_epoch": 0, "history": [{"epoch": 1, "train/loss": 1.0}], "stopped_early": False}
    (checkpoint / "progress.json").write_text(json.dumps(progress))
    with pytest.raises(
        ConfigError,
        match=r"the train manifest \(hash 0123456789abcdef -> .*optim\.lr \(0\.2 -> 0\.1\)"
        r".*tracking\.allow_changed_resume=true",
    ) as caught:
        check_resume_compatible(str(tmp_path), "run", config, manifest)
    assert "\n" not in str(caught.value)
    more_epochs = load_config(overrides=[*base, "optim.epochs=200", "tracking.allow_changed_resume=true"])
    check_resume_compatible(str(tmp_path), "run", more_epochs, manifest)  # allowed explicitly: no error
    # At an epoch's end the next epoch is planned afresh: another loader or world size is fine.
    other_loader = [*base, "data.loader_workers=3", "scaling.num_workers=4", "tracking.allow_changed_resume=true"]
    check_resume_compatible(str(tmp_path), "run", load_config(overrides=other_loader), manifest)


def test_a_resume_within_an_epoch_is_refused_when_the_order_of_its_samples_would_change(tiny_shards, tmp_path):
    """Steps done within an epoch count batches of one order (rank plans, loader processes, shuffle streams):
    under other values the rest of the epoch would skip some samples and repeat others."""
    import json

    import pytest

    from pipeline.config import load_config
    from pipeline.data.manifest import read_manifest
    from pipeline.errors import ConfigError
    from pipeline.train.driver import check_resume_compatible

    base = [f"data.root={tiny_shards}", "optim.batch_size=16", "scaling.num_workers=2"]
    config = load_config(overrides=base)
    manifest = read_manifest(tiny_shards / "train")
    checkpoint = tmp_path / "run" / "checkpoint_2026-12-01_00-00-00"
    checkpoint.mkdir(parents=True)
    (checkpoint / "meta.json").write_text(
        json.dumps(
            {
                "model": "resnet18",
                "num_classes": manifest.num_classes,
                "manifest_hash": manifest.content_hash(),
                "config": config.model_dump(mode="json"),
            }
        )
    )
    progress = {"epoch": 1, "step_in_epoch": 1, "history": [{"epoch": 1, "train/loss": 1.0}], "stopped_early": False}
    (checkpoint / "progress.json").write_text(json.dumps(progress))
    check_resume_compatible(str(tmp_path), "run", config, manifest)  # the same settings continue
    changed = load_config(overrides=[*base, "data.loader_workers=3", "seed=7"])
    with pytest.raises(
        ConfigError,
        match=r"seed \(0 -> 7, .*data\.loader_workers \(2 -> 3, and the latest "
        r"checkpoint is within an epoch\)",
    ) as caught:
        check_resume_compatible(str(tmp_path), "run", changed, manifest)
    assert "\n" not in str(caught.value)

"""Planning a refit from what a sweep left in MLflow (fabricated here; the real sweep-then-refit runs in
test_search): the best trial's own config, its best epoch count, train + val, and every bad input refused."""

import time

import pytest
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from pipeline import metrics as m
from pipeline.config import PROJECT_ROOT, ConfigError, load_config
from pipeline.tracking.run_config import CONFIG_ARTIFACT, loggable
from pipeline.tracking.runs import RUN_NAME_TAG, prepare_tracking
from pipeline.tracking.sweeps import BEST_TRIAL_TAG, SWEEP_TAG
from pipeline.tune.refit import REFIT_EPOCHS_TAG, REFIT_SWEEP_TAG, REFIT_TRIAL_TAG, plan_refit

SWEEP_FILES = [PROJECT_ROOT / "jobs" / "configs" / "demo_sweep.yaml"]  # searches optim.lr, batch_size, dropout


def _locator(tmp_path, *sets):
    return load_config(
        SWEEP_FILES,
        [f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", "tracking.experiment=refit-tests", *sets],
    )


def _fake_sweep(
    tmp_path,
    name="s1",
    trial="ab12c_00001",
    val_top1=(40.0, 55.0, 55.0, 50.0),
    trial_sets=(),
    log_config=True,
    best_trial=True,
):
    locator = _locator(tmp_path)
    uri, experiment_id = prepare_tracking(locator)
    client = MlflowClient(uri)
    parent = client.create_run(experiment_id, run_name=name, tags={RUN_NAME_TAG: name, SWEEP_TAG: "parent"})
    if best_trial:
        client.set_tag(parent.info.run_id, BEST_TRIAL_TAG, trial)
    child_name = f"{name}-{trial}"
    child = client.create_run(
        experiment_id, run_name=child_name, tags={RUN_NAME_TAG: child_name, "mlflow.parentRunId": parent.info.run_id}
    )
    trial_config = load_config(
        SWEEP_FILES,
        [
            "optim.lr=0.37",
            "model.dropout=0.2",
            "optim.epochs=9",
            "optim.patience=5",
            "tracking.knn_every=2",
            *trial_sets,
        ],
    )
    if log_config:
        client.log_dict(child.info.run_id, loggable(trial_config), CONFIG_ARTIFACT)
    now = int(time.time() * 1000)
    client.log_batch(
        child.info.run_id,
        metrics=[Metric(m.VAL_TOP1, value, now, epoch) for epoch, value in enumerate(val_top1, start=1)],
    )
    return locator, parent.info.run_id, child.info.run_id


def test_the_refit_takes_the_trials_config_and_the_first_epoch_of_its_best_score(tmp_path):
    locator, parent_id, child_id = _fake_sweep(tmp_path)
    config, options = plan_refit(locator, "s1", ["scaling.num_workers=4"])
    assert (config.optim.lr, config.model.dropout) == (0.37, 0.2)  # the trial's sampled values
    assert config.data.fit_splits == ["train", "val"] and not config.data.validates
    assert config.optim.epochs == 2  # 55.0 first reached at epoch 2
    assert config.optim.patience is None and config.tracking.knn_every is None  # both need a val split
    assert config.scaling.num_workers == 4  # --set applies on top of the trial's config
    assert config.tracking.run_name == "s1-refit" and config.tracking.tracking_uri == locator.tracking.tracking_uri
    assert options.parent_run_id == parent_id and options.trial_run_id == child_id
    assert options.gate_score == 55.0 and "gated on the sweep's val/top1 55.00" in options.gate_note
    assert options.tags[REFIT_SWEEP_TAG] == "s1" and options.tags[REFIT_TRIAL_TAG] == "ab12c_00001"
    assert options.tags[REFIT_EPOCHS_TAG] == "2"


def test_a_plateau_schedule_cannot_be_refit(tmp_path):
    _fake_sweep(tmp_path, trial_sets=["optim.schedule=plateau"])
    with pytest.raises(
        ConfigError, match="refit of sweep 's1' trial ab12c_00001: optim.schedule = 'plateau' needs a val split"
    ) as caught:
        plan_refit(_locator(tmp_path, "optim.schedule=plateau"), "s1", [])
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    "kind, message",
    [
        ("no-sweep", "--sweep 'nope': no sweep of that name"),
        ("no-best", "the sweep has no best trial yet"),
        ("no-config", "has no config.json"),
    ],
)
def test_what_cannot_be_refit_is_refused_in_one_line(tmp_path, kind, message):
    locator, _, _ = _fake_sweep(tmp_path, best_trial=kind != "no-best", log_config=kind != "no-config")
    with pytest.raises(ConfigError, match=message):
        plan_refit(locator, "nope" if kind == "no-sweep" else "s1", [])


def test_a_refit_config_refuses_what_needs_validation():
    with pytest.raises(ConfigError, match=r"optim.patience = 3 needs a val split"):
        load_config(overrides=["data.fit_splits=[train, val]", "optim.patience=3"])
    with pytest.raises(ConfigError, match=r"data.fit_splits.*choose \[train\]"):
        load_config(overrides=["data.fit_splits=[val]"])
    assert load_config(overrides=["data.fit_splits=[train, val]"]).data.validates is False


@pytest.mark.parametrize(
    "key, value",
    [
        ("data.shard_command", "sh -c 'touch {marker}' {{url}}"),
        ("data.root", "/somewhere/else"),
        ("data.shard_url_schemes", "[https]"),
        ("tracking.storage_path", "/tmp/elsewhere"),
    ],
)
def test_a_trial_artifact_cannot_choose_what_runs_or_where_data_is_read(tmp_path, key, value):
    marker = tmp_path / "payload-ran"
    _fake_sweep(tmp_path, trial_sets=[f"{key}={value.format(marker=marker)}"])
    with pytest.raises(ConfigError, match=rf"the trial's config.json has {key} = .* but your config has") as caught:
        plan_refit(_locator(tmp_path), "s1", [])
    assert "\n" not in str(caught.value) and "--set " + key in str(caught.value)
    assert not marker.exists()


def test_only_searched_keys_come_from_the_artifact_and_a_set_key_is_the_users(tmp_path):
    _fake_sweep(tmp_path, trial_sets=["optim.batch_size=16", "data.loader_workers=3"])
    config, _ = plan_refit(_locator(tmp_path, "data.loader_workers=1"), "s1", ["data.loader_workers=1"])
    assert config.optim.batch_size == 16 and config.data.loader_workers == 1
    with pytest.raises(ConfigError, match="has data.loader_workers = 3 but your config has"):
        plan_refit(_locator(tmp_path), "s1", [])


def test_without_the_sweeps_search_space_nothing_is_taken_and_the_difference_is_named(tmp_path):
    _fake_sweep(tmp_path)
    plain = load_config(
        overrides=[f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", "tracking.experiment=refit-tests"]
    )
    with pytest.raises(ConfigError, match=r"only searched keys \(none\) .*pass the sweep's config files"):
        plan_refit(plain, "s1", [])

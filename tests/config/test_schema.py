"""Schema: every section's defaults and checks; each bad value fails in one line naming the key and the value."""

import pytest
import yaml

from pipeline.config import ConfigError, load_config, validate_config


def test_per_worker_batch_is_derived_from_the_global_batch():
    config = load_config(overrides=["optim.batch_size=96", "scaling.num_workers=3"])
    assert config.per_worker_batch_size == 32
    local = load_config(overrides=["optim.batch_size=96", "scaling.num_workers=0"])
    assert local.per_worker_batch_size == 96


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("model.name=vgg16", r"model\.name = 'vgg16': Input should be 'alexnet', 'alexnet_tv', 'resnet18'"),
        ("optim.lr=-0.1", r"optim\.lr = -0\.1: Input should be greater than 0"),
        ("optim.batch_size=33", r"optim\.batch_size = 33 is not divisible by scaling\.num_workers = 2"),
        ("model.dropout=1.5", r"model\.dropout = 1\.5: Input should be less than 1"),
        ("optim.lrr=0.1", r"optim\.lrr: unknown key"),
        ("optim.optimizer=rmsprop", r"optim\.optimizer = 'rmsprop'"),
        ("scaling.num_workers=two", r"scaling\.num_workers = 'two': Input should be a valid integer"),
        ("data.root=nope://bucket/x", r"data\.root = 'nope://bucket/x': fsspec knows no nope:// protocol"),
        ("data.shard_command=aws s3 cp -", r"data\.shard_command = 'aws s3 cp -': must contain \{url\}"),
    ],
)
def test_invalid_values_fail_with_one_line_naming_key_and_value(override, expected):
    with pytest.raises(ConfigError, match=expected) as caught:
        load_config(overrides=[override])
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("tracking.run_name=it's", r"tracking\.run_name = \"it's\": use 1-128 letters, digits"),
        ("tracking.run_name=../escape", r"tracking\.run_name = '\.\./escape': use 1-128 letters"),
        ("seed=-1", r"seed = -1: Input should be greater than or equal to 0"),
        ("seed=4294967296", r"seed = 4294967296: Input should be less than 4294967296"),
        ("data.train_image_size=32", r"data\.train_image_size = 32: alexnet needs inputs of at least 63 px"),
        ("search.space={optim.lr: {low: 1}}", r"search\.space\.optim\.lr\.kind: this key is required here and missing"),
        ("data.shard_url_schemes=[pipe]", r"'pipe' is not a URL scheme"),
    ],
)
def test_unsafe_or_impossible_values_are_refused_at_load(override, expected):
    with pytest.raises(ConfigError, match=expected) as caught:
        load_config(overrides=["model.name=alexnet", "data.eval_image_size=64", "data.train_image_size=64", override])
    assert "\n" not in str(caught.value)


def test_search_space_is_validated():
    ok = validate_config(
        {
            "search": {
                "space": {
                    "optim.lr": {"kind": "loguniform", "low": 1e-3, "high": 1.0},
                    "optim.batch_size": {"kind": "choice", "values": [64, 128]},
                }
            }
        }
    )
    assert ok.search.space["optim.lr"].kind == "loguniform"
    with pytest.raises(ConfigError, match="needs low < high"):
        validate_config({"search": {"space": {"model.dropout": {"kind": "uniform", "low": 0.5, "high": 0.1}}}})
    with pytest.raises(ConfigError, match="needs low > 0"):
        validate_config({"search": {"space": {"optim.lr": {"kind": "loguniform", "low": 0, "high": 1}}}})
    with pytest.raises(ConfigError, match="non-empty 'values'"):
        validate_config({"search": {"space": {"optim.batch_size": {"kind": "choice", "values": []}}}})


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["optim.warmup_epochs=1"], r"^optim\.warmup_epochs = 1\.0: the plateau schedule has no warmup"),
        (["optim.patience=3", "optim.plateau_patience=3"], r"^optim\.patience = 3 must exceed optim\.plateau_patience"),
        (["optim.min_lr=0.1", "optim.lr=0.1"], r"^optim\.min_lr = 0\.1 is not below optim\.lr = 0\.1"),
        (["optim.step_gamma=1.0"], r"^optim\.step_gamma = 1\.0: the plateau schedule needs a multiplier below 1"),
    ],
)
def test_plateau_schedule_refuses_settings_it_cannot_honour_in_one_line(overrides, expected):
    with pytest.raises(ConfigError, match=expected) as caught:
        load_config(overrides=["optim.schedule=plateau", *overrides])
    assert "\n" not in str(caught.value)
    load_config(overrides=["optim.schedule=cosine", *overrides])  # the other schedules accept them


def test_gpu_decoding_without_gpus_is_refused_at_config_load():
    with pytest.raises(ConfigError, match="data.decode = 'gpu' decodes JPEGs on the training workers' GPUs"):
        load_config(overrides=["data.decode=gpu"])
    assert load_config(overrides=["data.decode=gpu", "scaling.use_gpu=true"]).data.decode == "gpu"


@pytest.mark.parametrize("value", ["0", "-1", "89478486", "1.5", "many"])
def test_max_image_pixels_is_validated_at_config_load(value):
    with pytest.raises(ConfigError, match=r"data\.max_image_pixels") as caught:
        load_config(overrides=[f"data.max_image_pixels={value}"])
    assert "\n" not in str(caught.value)
    assert load_config(overrides=["data.max_image_pixels=89478485"]).data.max_image_pixels == 89_478_485


@pytest.mark.parametrize(
    "needs_val",
    ["optim.schedule=plateau", "optim.patience=2", "tracking.knn_every=1"],
)
def test_a_refit_trains_on_val_so_settings_that_read_val_are_refused(needs_val):
    refit = load_config(overrides=["data.fit_splits=[train, val]"])
    assert not refit.data.validates and load_config().data.validates
    key = needs_val.partition("=")[0].replace(".", r"\.")
    with pytest.raises(ConfigError, match=rf"^{key} = .* needs a val split, and data\.fit_splits = \['train', 'val'\]"):
        load_config(overrides=["data.fit_splits=[train, val]", needs_val])
    with pytest.raises(ConfigError, match=r"data\.fit_splits = \['val'\]: choose \[train\]"):
        load_config(overrides=["data.fit_splits=[val]"])


def test_resolved_config_round_trips_through_yaml():
    config = load_config(overrides=["optim.lr=0.3", "model.name=resnet50"])
    again = validate_config(yaml.safe_load(config.to_yaml()))
    assert again == config


def test_relative_paths_are_pinned_to_the_launch_directory_before_workers_start(tmp_path, monkeypatch):
    # Ray workers run in another directory: a relative data.root would point nowhere there.
    monkeypatch.chdir(tmp_path)
    config = load_config(overrides=["data.root=shards", "tracking.storage_path=runs"]).with_absolute_paths()
    assert config.data.root == str(tmp_path / "shards")
    assert config.tracking.storage_path == str(tmp_path / "runs")
    remote = load_config(overrides=["tracking.storage_path=s3://bucket/ray"]).with_absolute_paths()
    assert remote.tracking.storage_path == "s3://bucket/ray"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert load_config(overrides=["data.root=~/shards"]).with_absolute_paths().data.root == str(
        tmp_path / "home" / "shards"
    )


@pytest.mark.parametrize("url", ["memory://bucket/imagenet", "file:///data/imagenet"])
def test_url_roots_are_left_exactly_as_given(url):
    # A URL is not relative to the launch directory: pinning it would turn it into a local path.
    assert load_config(overrides=[f"data.root={url}"]).with_absolute_paths().data.root == url


def test_a_url_whose_backend_is_missing_names_the_package_to_install(monkeypatch):
    import fsspec

    def missing_backend(protocol):
        raise ImportError("Install s3fs to access S3")

    monkeypatch.setattr(fsspec, "get_filesystem_class", missing_backend)  # whether or not s3fs is installed here
    with pytest.raises(ConfigError) as caught:
        load_config(overrides=["data.root=s3://b/x"])
    assert str(caught.value) == (
        "data.root = 's3://b/x': reading s3:// needs the s3fs package: pip install 'imagenet-ray-pipeline[cloud]'"
    )

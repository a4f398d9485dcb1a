"""Config: YAML -> overrides -> one validated object; every bad value is one line naming key and value."""

import pytest
import yaml

from pipeline.config import (
    DEFAULT_CONFIG,
    PROJECT_ROOT,
    Config,
    ConfigError,
    load_config,
    require_shards,
    validate_config,
)


def test_default_yaml_lists_every_key_with_the_code_defaults():
    # The documented defaults file and the typed defaults must never drift apart.
    from_file = yaml.safe_load(DEFAULT_CONFIG.read_text())
    assert from_file == Config().model_dump(mode="json")


def test_every_shipped_config_validates():
    assert (PROJECT_ROOT / "pyproject.toml").is_file()  # the project's root, wherever the config code sits in it
    shipped = sorted((PROJECT_ROOT / "jobs" / "configs").glob("*.yaml"))
    assert DEFAULT_CONFIG in shipped and len(shipped) > 1
    for path in shipped:
        load_config([DEFAULT_CONFIG, path])


def test_files_merge_left_to_right_and_overrides_win(tmp_path):
    extra = tmp_path / "extra.yaml"
    extra.write_text("optim:\n  lr: 0.05\n  epochs: 3\nmodel:\n  name: alexnet\n")
    config = load_config([DEFAULT_CONFIG, extra], ["optim.lr=0.2", "scaling.use_gpu=true", "data.root=/x/y"])
    assert config.optim.lr == 0.2
    assert config.optim.epochs == 3
    assert config.optim.momentum == 0.9  # untouched default survives the merge
    assert config.model.name == "alexnet"
    assert config.scaling.use_gpu is True
    assert config.data.root == "/x/y"


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


def test_malformed_override_and_files_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        load_config(overrides=["optim.lr"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config([tmp_path / "missing.yaml"])
    broken = tmp_path / "broken.yaml"
    broken.write_text("optim: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config([broken])
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config([listed])


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


def test_missing_shards_fail_before_any_worker_starts(tmp_path):
    config = load_config(overrides=[f"data.root={tmp_path / 'nope'}"])
    with pytest.raises(ConfigError, match=r"data\.root = '.*nope': directory does not exist"):
        require_shards(config)
    (tmp_path / "nope" / "train").mkdir(parents=True)
    with pytest.raises(ConfigError, match="no train/manifest.json"):
        require_shards(config)


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


def test_a_url_root_needs_the_manifests_of_its_splits(memory_shards):
    require_shards(load_config(overrides=[f"data.root={memory_shards}"]), ("train", "val", "test"))
    empty = load_config(overrides=[f"data.root={memory_shards}/nothing-here"])
    with pytest.raises(ConfigError, match=r"data\.root = 'memory://.*/nothing-here': no train/manifest\.json"):
        require_shards(empty)


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


def test_a_relative_data_root_inside_a_ray_jobs_working_dir_copy_says_why(tmp_path):
    from pipeline.config import ConfigError, load_config, require_shards

    copy = tmp_path / "session_x" / "runtime_resources" / "working_dir_files" / "_ray_pkg_ab12" / "data" / "shards"
    config = load_config(overrides=[f"data.root={copy}"])
    with pytest.raises(
        ConfigError, match="runs in Ray's copy of the working directory.*absolute path every node reaches"
    ):
        require_shards(config)


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


def test_a_binary_or_malformed_config_file_is_one_line_naming_file_and_line(tmp_path):
    binary = tmp_path / "model.pt"
    binary.write_bytes(b"\x80\x02\xff\xfe\x00binary")
    with pytest.raises(ConfigError, match=r"model\.pt is not UTF-8 text"):
        load_config([binary])
    malformed = tmp_path / "bad.yaml"
    malformed.write_text("optim:\n  lr: 0.1\n  batch_size: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml is not valid YAML at line \d+, column \d+") as caught:
        load_config([malformed])
    assert "\n" not in str(caught.value)


def test_an_init_for_another_model_is_refused_but_an_older_saved_config_still_loads():
    """Configs saved before inits per model carry init: paper for every model (it meant something to alexnet
    only); they still load. Typed by a user, the same value names what the model takes instead."""
    from pipeline.config import validate_saved_config

    with pytest.raises(ConfigError, match=r"model\.init = 'paper' does not apply to resnet18, which has no init"):
        load_config(overrides=["model.init=paper"])
    saved = Config().model_dump(mode="json")
    saved["model"]["init"] = "paper"
    assert validate_saved_config(saved).model.init is None
    saved["model"]["name"] = "alexnet"
    assert validate_saved_config(saved).model.init == "paper"

"""Loading: YAML files merged left to right, `--set` overrides last, one validation; configs saved by older
versions still load; the shipped configs are valid."""

import pytest
import yaml

from pipeline.config import (
    DEFAULT_CONFIG,
    PROJECT_ROOT,
    Config,
    ConfigError,
    load_config,
    set_key,
    validate_config,
    with_overrides,
    with_text_overrides,
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


def test_set_overrides_are_typed_as_yaml_and_validated_with_the_whole_config():
    # What `refit` does with a user's `--set` texts on top of a saved config.
    base = load_config(overrides=["optim.lr=0.2"])
    changed = with_text_overrides(base, ["optim.epochs=7", "scaling.use_gpu=true", "tracking.run_name=again"])
    assert (changed.optim.epochs, changed.scaling.use_gpu, changed.tracking.run_name) == (7, True, "again")
    assert changed.optim.lr == 0.2 and base.optim.epochs == 90  # the rest kept; the original left alone
    with pytest.raises(ConfigError, match=r"optim\.batch_size = 255 is not divisible by scaling\.num_workers = 2"):
        with_text_overrides(base, ["optim.batch_size=255"])


def test_tunes_sampled_values_go_through_the_same_keys_and_checks():
    import numpy as np

    base = load_config()
    # Tune's samplers hand out numpy scalars: they land as plain numbers, so the trial's config saves as YAML.
    sampled = with_overrides(base, {"optim.lr": np.float64(0.03), "optim.batch_size": np.int64(64)})
    assert sampled.optim.lr == 0.03 and type(sampled.optim.lr) is float
    assert sampled.optim.batch_size == 64 and type(sampled.optim.batch_size) is int
    assert validate_config(yaml.safe_load(sampled.to_yaml())) == sampled
    assert base.optim.lr == 0.1  # the base config is left alone
    with pytest.raises(ConfigError, match=r"optim\.lrr: unknown key"):
        with_overrides(base, {"optim.lrr": 0.1})


def test_a_key_through_a_value_names_where_it_came_from():
    raw = {"optim": {"lr": 0.1}}
    set_key(raw, "optim.momentum", 0.8, "unused")
    set_key(raw, "search.num_samples", 4, "unused")  # sections along the way are made
    assert raw == {"optim": {"lr": 0.1, "momentum": 0.8}, "search": {"num_samples": 4}}
    with pytest.raises(ConfigError, match=r"^override 'optim\.lr\.x=1': lr is a value, not a section$"):
        load_config(overrides=["optim.lr.x=1"])
    with pytest.raises(ConfigError, match=r"^optim\.lr\.x: lr is a value, not a section$"):
        with_overrides(load_config(), {"optim.lr.x": 1})

"""Environment: what a config needs from where it runs (shards on disk or behind a URL, paths outside a Ray
job's copy of the code) is checked before any worker starts."""

import pytest

from pipeline.config import ConfigError, load_config, refuse_job_copy, require_shards


def test_missing_shards_fail_before_any_worker_starts(tmp_path):
    config = load_config(overrides=[f"data.root={tmp_path / 'nope'}"])
    with pytest.raises(ConfigError, match=r"data\.root = '.*nope': directory does not exist"):
        require_shards(config)
    (tmp_path / "nope" / "train").mkdir(parents=True)
    with pytest.raises(ConfigError, match="no train/manifest.json"):
        require_shards(config)


def test_only_the_splits_asked_for_are_required(tiny_shards, tmp_path):
    require_shards(load_config(overrides=[f"data.root={tiny_shards}"]), ("train", "val", "test"))
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "manifest.json").write_bytes((tiny_shards / "train" / "manifest.json").read_bytes())
    only_train = load_config(overrides=[f"data.root={tmp_path}"])
    require_shards(only_train, ("train",))  # e.g. `load --split train`
    with pytest.raises(ConfigError, match="no val/manifest.json"):
        require_shards(only_train)  # training validates on val as well


def test_a_url_root_needs_the_manifests_of_its_splits(memory_shards):
    require_shards(load_config(overrides=[f"data.root={memory_shards}"]), ("train", "val", "test"))
    empty = load_config(overrides=[f"data.root={memory_shards}/nothing-here"])
    with pytest.raises(ConfigError, match=r"data\.root = 'memory://.*/nothing-here': no train/manifest\.json"):
        require_shards(empty)


def test_a_relative_data_root_inside_a_ray_jobs_working_dir_copy_says_why(tmp_path):
    copy = tmp_path / "session_x" / "runtime_resources" / "working_dir_files" / "_ray_pkg_ab12" / "data" / "shards"
    config = load_config(overrides=[f"data.root={copy}"])
    with pytest.raises(
        ConfigError, match="runs in Ray's copy of the working directory.*absolute path every node reaches"
    ):
        require_shards(config)


def test_any_location_inside_a_ray_jobs_copy_is_refused_naming_key_value_and_problem():
    copy = "/tmp/ray/session_1/runtime_resources/working_dir_files/_ray_pkg_9f/ray_results"
    with pytest.raises(ConfigError) as caught:
        refuse_job_copy("tracking.storage_path", copy, "checkpoints there would vanish with the job")
    assert str(caught.value).startswith(f"tracking.storage_path = '{copy}': checkpoints there would vanish")
    assert "\n" not in str(caught.value)
    refuse_job_copy("tracking.storage_path", "/mnt/nfs/ray_results", "unused")  # elsewhere: no objection
    refuse_job_copy("tracking.storage_path", "s3://bucket/ray_results", "unused")

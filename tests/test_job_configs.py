"""The shipped job configs: each loads, each ImageNet recipe matches its published recipe and names its target,
and each sweep passes every search check that needs no cluster."""

import re
from pathlib import Path

import pytest

from pipeline.config import PROJECT_ROOT, load_config
from pipeline.train.optim import scaled_lr
from pipeline.tune.search import cluster_fit_problem, concurrent_trials

CONFIGS = PROJECT_ROOT / "jobs" / "configs"
SWEEP_BASES = {  # a sweep is layered on the recipe it tunes
    "demo_sweep.yaml": "demo.yaml",
    "alexnet_sweep.yaml": "alexnet_imagenet.yaml",
    "resnet18_sweep.yaml": "resnet18_imagenet.yaml",
}
IMAGENET_RECIPES = sorted(path.name for path in CONFIGS.glob("*_imagenet.yaml"))
# The clusters the ImageNet configs are sized for: one 8-GPU node with 96 vCPUs, or infra/kuberay's gpu group
# (2 pods x 4 GPUs, 44 CPUs).
CLUSTERS = {"one 8-GPU node": [{"CPU": 96.0, "GPU": 8.0}], "infra/kuberay": [{"CPU": 44.0, "GPU": 4.0}] * 2}


def layers(name: str) -> list[Path]:
    return [CONFIGS / SWEEP_BASES[name], CONFIGS / name] if name in SWEEP_BASES else [CONFIGS / name]


def comments(name: str) -> str:
    return "\n".join(line for line in (CONFIGS / name).read_text().splitlines() if line.lstrip().startswith("#"))


def test_every_sweep_names_its_base_recipe():
    assert sorted(path.name for path in CONFIGS.glob("*_sweep.yaml")) == sorted(SWEEP_BASES)
    assert IMAGENET_RECIPES == ["alexnet_imagenet.yaml", "resnet18_imagenet.yaml", "resnet50_imagenet.yaml"]


@pytest.mark.parametrize("name", sorted(path.name for path in CONFIGS.glob("*.yaml")))
def test_every_config_loads_alone_or_on_its_base(name):
    load_config(layers(name))


@pytest.mark.parametrize("name", sorted(SWEEP_BASES))
def test_every_sweep_passes_the_search_checks_that_need_no_cluster(name, monkeypatch):
    from pipeline.tune import search

    monkeypatch.setattr(search, "require_shards", lambda config, splits: None)  # the shards live on the cluster
    config = load_config(layers(name))
    search.check_search(config)  # every extreme of the space validates as a whole config
    assert set(search.param_space(config)) == set(config.search.space)
    search.tune_config(config)
    assert {"optim.lr", "optim.batch_size", "model.dropout"} <= set(config.search.space)
    assert config.search.grace_period < config.optim.epochs


@pytest.mark.parametrize("name", ["alexnet_sweep.yaml", "resnet18_sweep.yaml"])
def test_imagenet_sweeps_fit_their_node_and_run_shorter_than_the_recipe(name):
    config, recipe = load_config(layers(name)), load_config([CONFIGS / SWEEP_BASES[name]])
    trial = config.scaling
    assert config.search.max_concurrent_trials * trial.num_workers * trial.gpus_per_worker == 8  # every GPU busy
    for cluster, nodes in CLUSTERS.items():
        assert cluster_fit_problem(config, nodes) is None, cluster
        assert concurrent_trials(config, nodes) >= config.search.max_concurrent_trials, cluster
    assert config.optim.epochs < recipe.optim.epochs
    assert config.search.num_samples > config.search.max_concurrent_trials
    assert f"python -m jobs.tune -c jobs/configs/{SWEEP_BASES[name]} -c jobs/configs/{name}" in comments(name)


@pytest.mark.parametrize("name", IMAGENET_RECIPES)
def test_imagenet_recipes_name_their_published_target_and_run_on_the_shared_gpu_cluster(name):
    text = comments(name)
    assert re.search(r"\d+(\.\d+)? % top-1", text), f"{name}: no published top-1 target in a comment"
    assert f"ray job submit --working-dir . -- python -m jobs.train -c jobs/configs/{name}" in text
    config = load_config([CONFIGS / name])
    assert config.scaling.use_gpu and config.scaling.num_workers == 8
    assert config.scaling.mixed_precision == "auto"
    assert config.scaling.cpus_per_worker >= config.data.loader_workers + 1
    for cluster, nodes in CLUSTERS.items():
        assert cluster_fit_problem(config, nodes) is None, cluster
        assert concurrent_trials(config, nodes) >= config.search.max_concurrent_trials, cluster
    assert str(config.data.root) == "/mnt/shared/imagenet-shards"
    assert config.tracking.storage_path == "/mnt/shared/ray_results"


def test_alexnet_is_the_2012_paper_recipe():
    config = load_config([CONFIGS / "alexnet_imagenet.yaml"])
    assert config.model.name == "alexnet" and config.model.dropout == 0.5
    assert config.optim.batch_size == 128 and scaled_lr(config.optim) == pytest.approx(0.01)
    assert config.optim.optimizer == "sgd" and config.optim.momentum == 0.9
    assert config.optim.weight_decay == pytest.approx(5e-4)
    assert config.optim.epochs == 90
    assert config.optim.schedule == "plateau" and config.optim.step_gamma == pytest.approx(0.1)
    assert "40.7 %" in comments("alexnet_imagenet.yaml") and "56.5 %" in comments("alexnet_imagenet.yaml")


def test_resnet50_is_torchvisions_90_epoch_recipe():
    config = load_config([CONFIGS / "resnet50_imagenet.yaml"])
    assert config.model.name == "resnet50"
    assert config.optim.epochs == 90 and config.optim.lr == pytest.approx(0.1)  # per 256 images
    assert config.optim.batch_size == 256 and scaled_lr(config.optim) == pytest.approx(0.1)
    assert config.optim.weight_decay == pytest.approx(1e-4) and config.optim.momentum == 0.9
    assert (config.optim.schedule, config.optim.step_epochs, config.optim.step_gamma) == ("step", 30, 0.1)
    assert "76.1 % top-1" in comments("resnet50_imagenet.yaml")


def test_resnet18_short_recipe_trains_small_and_tests_at_224():
    config = load_config([CONFIGS / "resnet18_imagenet.yaml"])
    assert config.model.name == "resnet18"
    assert 160 <= config.data.train_image_size <= 192 and config.data.eval_image_size == 224
    assert config.optim.epochs < 90 and config.optim.label_smoothing == pytest.approx(0.1)
    assert config.optim.schedule == "cosine" and config.optim.warmup_epochs > 0
    assert scaled_lr(config.optim) == pytest.approx(0.1 * config.optim.batch_size / 256)
    assert "69.8 % top-1" in comments("resnet18_imagenet.yaml")

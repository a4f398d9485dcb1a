"""The model table: one entry per architecture, read by the config, the builders and the feature extractor."""

import subprocess
import sys

import pytest

from pipeline.architectures import (
    ALEXNET_ENSEMBLE_TOP5_ERROR,
    ARCHITECTURES,
    HUMAN_TOP5_ERROR,
    MODEL_NAMES,
    PUBLISHED_TOP1_TOP5,
    architecture,
)
from pipeline.errors import ConfigError

DEEP_RESNETS = ("resnet34", "resnet50", "resnet101", "resnet152")


def test_published_figures_cover_every_model():
    assert set(PUBLISHED_TOP1_TOP5) == set(MODEL_NAMES)
    assert PUBLISHED_TOP1_TOP5["alexnet"] == pytest.approx((59.3, 81.8))
    assert PUBLISHED_TOP1_TOP5["alexnet_tv"] == pytest.approx((56.5, 79.1), abs=0.05)
    assert PUBLISHED_TOP1_TOP5["resnet50"] == pytest.approx((76.1, 92.9), abs=0.05)
    assert PUBLISHED_TOP1_TOP5["resnet152"] == pytest.approx((78.3, 94.0), abs=0.05)
    resnet_top1 = [PUBLISHED_TOP1_TOP5[name][0] for name in ("resnet18", *DEEP_RESNETS)]
    assert resnet_top1 == sorted(resnet_top1)  # deeper is better, the point of residual learning
    # A single ResNet-152 crop (5.95 % top-5 error) sits between the 2012 ensemble and the human annotator.
    assert HUMAN_TOP5_ERROR < 100 - PUBLISHED_TOP1_TOP5["resnet152"][1] < ALEXNET_ENSEMBLE_TOP5_ERROR


def test_the_tables_torchvision_figures_are_the_ones_its_weights_state():
    # Read from the weights' metadata, which ships with torchvision: nothing is downloaded.
    import torchvision

    from_torchvision = {}
    for name, entry in ARCHITECTURES.items():
        if entry.torchvision_name is not None:
            weights = torchvision.models.get_model_weights(entry.torchvision_name).IMAGENET1K_V1
            metrics = weights.meta["_metrics"]["ImageNet-1K"]
            from_torchvision[name] = (metrics["acc@1"], metrics["acc@5"])
    assert set(from_torchvision) == set(MODEL_NAMES) - {"alexnet"}
    assert {name: PUBLISHED_TOP1_TOP5[name] for name in from_torchvision} == from_torchvision


def test_an_unknown_model_is_one_line_naming_every_choice():
    assert architecture("resnet50").feature_dim == 2048
    with pytest.raises(ConfigError) as caught:
        architecture("vgg16")
    assert str(caught.value) == (
        "model.name = 'vgg16': unknown model; choose one of "
        "alexnet, alexnet_tv, resnet18, resnet34, resnet50, resnet101, resnet152"
    )


def test_a_models_own_init_is_the_first_it_lists():
    # model.init = None builds each model as its own recipe does: the 2012 paper's, torchvision's, ResNet's.
    assert architecture("alexnet").default_init == "paper"
    assert architecture("alexnet_tv").default_init == "torchvision"
    assert all(ARCHITECTURES[name].default_init is None for name in ("resnet18", *DEEP_RESNETS))


def test_the_table_imports_without_torch():
    # The config imports the table: `imagenet-pipeline config` and CLI errors must not wait for torch to load.
    code = "import sys, pipeline.architectures; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0

"""Features are the input of the final linear layer, for eager and exported models alike."""

import pytest
import torch

from pipeline.architectures import ARCHITECTURES
from pipeline.config import ModelConfig
from pipeline.features.extract import feature_spec, with_features
from pipeline.inference.loading import FrozenEvalModule
from pipeline.train.models import build_model


def images(size: int, batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    ("name", "dim", "size"),
    [("resnet18", 512, 32), ("resnet50", 2048, 32), ("alexnet", 4096, 64), ("alexnet_tv", 4096, 64)],
)
def test_features_are_the_unit_length_input_of_the_classifier_layer(name, dim, size):
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name, dropout=0.2), num_classes=7).eval()
    batch = images(size)
    with torch.no_grad():
        expected_logits = model(batch)
        spec = feature_spec(name, model)
        logits, features = with_features(model)(batch)
    assert spec.dim == dim == ARCHITECTURES[name].feature_dim
    assert spec.layer == ARCHITECTURES[name].feature_layer == ("avgpool" if name.startswith("resnet") else "fc7")
    assert features.shape == (3, dim)
    torch.testing.assert_close(features.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(logits, expected_logits)
    # The classifier layer applied to the (un-normalised) features gives the logits: they are its input.
    last = model.fc if name.startswith("resnet") else model.classifier[-1]
    raw = {}
    last.register_forward_hook(lambda module, inputs, output: raw.setdefault("input", inputs[0]))
    with torch.no_grad():
        model(batch)
    torch.testing.assert_close(features, torch.nn.functional.normalize(raw["input"], dim=1))


def test_an_exported_model_gives_the_same_features_and_logits_as_the_eager_one():
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="resnet18", dropout=0.3), num_classes=5).eval()
    batch = images(32, batch=4)
    batch_dim = torch.export.Dim("batch", min=1)
    exported = FrozenEvalModule(torch.export.export(model, (batch,), dynamic_shapes=({0: batch_dim},)).module())
    assert feature_spec("resnet18", exported).dim == 512  # found without touching the graph
    with torch.no_grad():
        eager_logits, eager_features = with_features(model)(batch)
        logits, features = with_features(exported)(batch[:3])
    torch.testing.assert_close(features, eager_features[:3], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(logits, eager_logits[:3], atol=1e-5, rtol=1e-4)


def test_a_model_without_a_feature_layer_is_refused():
    from pipeline.errors import ModelSourceError

    with pytest.raises(ModelSourceError, match="no linear classifier layer"):
        with_features(torch.nn.Conv2d(3, 4, 3))
    with pytest.raises(ModelSourceError, match="architecture 'vgg16': no feature layer"):
        feature_spec("vgg16", torch.nn.Linear(3, 4))

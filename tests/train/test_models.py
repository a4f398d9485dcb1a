"""Models: shapes, the 2012 AlexNet's published design, parameter counts, dropout, embeddings, input checks."""

import math
from functools import cache

import pytest
import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from pipeline.architectures import MIN_IMAGE_SIZE, MODEL_NAMES
from pipeline.config import ModelConfig
from pipeline.train.models import build_model, count_parameters

DEEP_RESNETS = ("resnet34", "resnet50", "resnet101", "resnet152")


def build(name: str, num_classes: int = 1000, **settings) -> nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(name=name, **settings), num_classes)


@cache
def shared(name: str, **settings) -> nn.Module:
    """One 1000-class model per setting for tests that only read it (building AlexNet takes ~1 s on CPU)."""
    return build(name, **settings).eval()


def images(size: int, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_model_gives_one_logit_per_class(name):
    # Deep ResNets at 64 px: the same layers run, the CPU cost of 224 px is not needed to check the shape.
    size = 64 if name in DEEP_RESNETS else 224
    model = shared(name)
    with torch.no_grad():
        logits = model(images(size))
    assert logits.shape == (2, 1000)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", ["alexnet", "alexnet_tv", "resnet18"])
def test_small_models_train_at_64_px(name):
    # The tests and the demo train at 64 px; a backward pass must reach the first layer. (The deep ResNets
    # run at 64 px above; their backward pass costs seconds on CPU and exercises nothing new.)
    model = build(name, num_classes=10, dropout=0.5).train()
    loss = nn.functional.cross_entropy(model(images(64)), torch.tensor([3, 7]))
    loss.backward()
    first_conv = next(module for module in model.modules() if isinstance(module, nn.Conv2d))
    assert first_conv.weight.grad is not None and first_conv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["alexnet", "alexnet_tv"])
def test_alexnets_state_their_smallest_input_side(name):
    model = shared(name)
    smallest = MIN_IMAGE_SIZE[name]
    with torch.no_grad():
        assert model(images(smallest)).shape == (2, 1000)
        with pytest.raises(RuntimeError):
            model(images(smallest - 1))


def test_alexnet_has_the_2012_layout():
    model = shared("alexnet")
    convs = [module for module in model.modules() if isinstance(module, nn.Conv2d)]
    linears = [module for module in model.modules() if isinstance(module, nn.Linear)]
    assert [conv.out_channels for conv in convs] == [96, 256, 384, 384, 256]
    assert [(conv.kernel_size, conv.stride) for conv in convs[:2]] == [((11, 11), (4, 4)), ((5, 5), (1, 1))]
    assert all(conv.groups == 1 for conv in convs)  # one ungrouped tower, not the paper's two-GPU split
    assert [linear.out_features for linear in linears] == [4096, 4096, 1000]
    pools = [module for module in model.modules() if isinstance(module, nn.MaxPool2d)]
    assert [(pool.kernel_size, pool.stride) for pool in pools] == [(3, 2)] * 3  # overlapping pooling

    first_maps = []
    hook = convs[0].register_forward_hook(lambda module, inputs, output: first_maps.append(output.shape))
    with torch.no_grad():
        model(images(224, batch=1))
    hook.remove()
    assert first_maps == [(1, 96, 55, 55)]


def test_alexnet_response_norm_follows_the_flag():
    with_norm = shared("alexnet")
    without_norm = shared("alexnet", local_response_norm=False)
    norms = [module for module in with_norm.features if isinstance(module, nn.LocalResponseNorm)]
    assert len(norms) == 2
    # Each norm sits after the ReLU of conv1 / conv2 and before their max-pool.
    layers = list(with_norm.features)
    for norm in norms:
        position = layers.index(norm)
        assert isinstance(layers[position - 1], nn.ReLU) and isinstance(layers[position + 1], nn.MaxPool2d)
    assert not any(isinstance(module, nn.LocalResponseNorm) for module in without_norm.modules())
    assert count_parameters(with_norm) == count_parameters(without_norm)


def test_alexnet_response_norm_is_the_papers_formula():
    # b_c = a_c / (k + alpha * sum_{|j - c| <= 2} a_j^2)^beta with k=2, alpha=1e-4, beta=0.75 (section 3.3).
    norm = next(module for module in shared("alexnet").features if isinstance(module, nn.LocalResponseNorm))
    activations = torch.rand(1, 8, 3, 3, generator=torch.Generator().manual_seed(2)) * 50
    expected = torch.empty_like(activations)
    for channel in range(8):
        window = activations[:, max(0, channel - 2) : channel + 3]
        expected[:, channel] = activations[:, channel] / (2 + 1e-4 * (window**2).sum(1)) ** 0.75
    torch.testing.assert_close(norm(activations), expected)


def test_alexnet_starts_from_the_papers_initialisation():
    layers = [module for module in shared("alexnet").modules() if isinstance(module, (nn.Conv2d, nn.Linear))]
    # Bias 1 in conv2, conv4, conv5, fc6, fc7; 0 in conv1, conv3 and the output layer.
    biases = [layer.bias.unique().tolist() for layer in layers]
    assert biases == [[0.0], [1.0], [0.0], [1.0], [1.0], [1.0], [1.0], [0.0]]
    for layer in layers[1:]:  # conv1 has only 35 k weights; the rest pin the std to well under 1 %
        assert layer.weight.mean().abs() < 1e-3
        assert layer.weight.std().item() == pytest.approx(0.01, rel=0.01)


def test_parameter_counts_match_the_published_models():
    assert count_parameters(shared("alexnet_tv")) == 61_100_840
    assert count_parameters(shared("resnet50")) == 25_557_032
    assert count_parameters(shared("resnet152")) == 60_192_808
    # The single-tower AlexNet, counted by hand: (weights + biases) for conv1..5, then fc6..8.
    convs = [(96, 3, 11), (256, 96, 5), (384, 256, 3), (384, 384, 3), (256, 384, 3)]
    by_hand = sum(out * inp * k * k + out for out, inp, k in convs)
    by_hand += sum(out * inp + out for out, inp in [(4096, 256 * 6 * 6), (4096, 4096), (1000, 4096)])
    assert by_hand == 62_378_344
    assert count_parameters(shared("alexnet")) == pytest.approx(by_hand, rel=0.01)
    assert by_hand == pytest.approx(60e6, rel=0.05)  # the paper's "60 million" (grouped towers)


def test_resnet_dropout_keeps_torchvision_parameters():
    plain, with_dropout = shared("resnet50"), build("resnet50", dropout=0.3)
    assert isinstance(plain.fc, nn.Linear)
    assert count_parameters(with_dropout) == count_parameters(plain)
    renamed = {key.replace("fc.1.", "fc.") for key in with_dropout.state_dict()}
    assert renamed == set(plain.state_dict())


def test_resnets_start_each_residual_block_as_the_identity():
    last_norms = [block.bn2 for block in shared("resnet18").modules() if isinstance(block, BasicBlock)]
    last_norms += [block.bn3 for block in shared("resnet50").modules() if isinstance(block, Bottleneck)]
    assert len(last_norms) == 8 + 16
    assert all(norm.weight.abs().sum() == 0 for norm in last_norms)


@pytest.mark.parametrize("name", ["alexnet", "alexnet_tv", "resnet18"])
def test_dropout_setting_reaches_the_model(name):
    # Two training-mode passes over one batch: BatchNorm is deterministic, so only dropout can differ them.
    batch = images(64)
    for dropout, passes_differ in [(0.5, True), (0.0, False)]:
        model = build(name, num_classes=10, dropout=dropout)
        with torch.no_grad():
            first, second = model.train()(batch), model(batch)
            assert (not torch.equal(first, second)) == passes_differ
            assert torch.equal(model.eval()(batch), model(batch))
        assert {module.p for module in model.modules() if isinstance(module, nn.Dropout)} <= {dropout}


@pytest.mark.parametrize("num_classes", [1, 0, -5, 2.5, True])
def test_a_classifier_needs_at_least_two_classes(num_classes):
    with pytest.raises(ValueError, match=rf"num_classes = {num_classes!r}: .*>= 2"):
        build_model(ModelConfig(name="resnet18"), num_classes)


def test_unknown_models_are_rejected_with_the_choices():
    # Config loading already refuses the name; this guards configs built without validation.
    with pytest.raises(ValueError, match=r"model\.name = 'vgg16': unknown model; choose one of alexnet, "):
        build_model(ModelConfig.model_construct(name="vgg16", dropout=0.0, local_response_norm=True), 10)


def test_the_reference_initialisation_is_caffes_bvlc_alexnet():
    model = build_model(ModelConfig(name="alexnet", init="reference"), 10)
    convs = [module for module in model.features if isinstance(module, nn.Conv2d)]
    linears = [module for module in model.classifier if isinstance(module, nn.Linear)]
    assert [float(layer.bias.mean()) for layer in convs] == pytest.approx([0.0, 0.1, 0.0, 0.1, 0.1])
    assert [float(layer.bias.mean()) for layer in linears] == pytest.approx([0.1, 0.1, 0.0])
    assert [round(float(layer.weight.std()), 3) for layer in linears] == [0.005, 0.005, 0.01]


def test_alexnet_sees_the_papers_input_scale_and_alexnet_tv_can_take_kaimings_init():
    """The paper fed mean-subtracted pixels in 0-255 units; the loader's input is ImageNet-normalised, so the
    2012 net scales it back (by 255 x std per channel) before conv1. kaiming: torchvision's VGG init."""
    from pipeline.data.transforms import IMAGENET_STD

    model = build_model(ModelConfig(name="alexnet"), 10)
    assert model.pixel_scale.flatten().tolist() == pytest.approx([255 * std for std in IMAGENET_STD])
    # Saved with the weights; weights saved before it existed were trained at unit scale and keep it.
    older = {key: value for key, value in model.state_dict().items() if key != "pixel_scale"}
    reloaded = build_model(ModelConfig(name="alexnet"), 10)
    reloaded.load_state_dict(older)
    assert reloaded.pixel_scale.flatten().tolist() == [1.0, 1.0, 1.0]
    reloaded.load_state_dict(model.state_dict())
    assert torch.equal(reloaded.pixel_scale, model.pixel_scale)
    tv = build_model(ModelConfig(name="alexnet_tv", init="kaiming"), 10)
    first = tv.features[0]
    assert float(first.weight.std()) == pytest.approx((2 / (64 * 11 * 11)) ** 0.5, rel=0.05)  # fan-out
    assert float(first.bias.abs().max()) == 0.0
    with pytest.raises(
        ValueError, match="model.init = 'reference' does not apply to alexnet_tv, which takes torchvision or kaiming"
    ):
        ModelConfig(name="alexnet_tv", init="reference")


@pytest.fixture(scope="module")
def four_class_shards(tmp_path_factory):
    from pipeline.data.sharding import shard_imagenet
    from pipeline.data.synthetic import generate_imagenet_folder

    base = tmp_path_factory.mktemp("four")
    generate_imagenet_folder(
        base / "source", num_classes=4, train_per_class=30, val_per_class=2, width=80, height=64, seed=1
    )
    shard_imagenet(base / "source", base / "shards", val_per_class=10, samples_per_shard=40, seed=1, progress=False)
    return base / "shards"  # train 80, val 40


def _recipe_run(shards, epochs, *overrides):
    """The shipped AlexNet recipe (jobs/configs/alexnet_imagenet.yaml), shortened: 64 px, one process on the CPU,
    global batch 16 (lr per 256 as shipped, so 0.00125), `epochs` epochs. (train loss, val top-1) per epoch."""
    from pipeline.config import PROJECT_ROOT, load_config
    from pipeline.data.loader import build_loader
    from pipeline.train.step import RankDevice, Trainee, evaluate, record_epoch, train_one_epoch

    config = load_config(
        [PROJECT_ROOT / "jobs" / "configs" / "alexnet_imagenet.yaml"],
        overrides=[
            f"data.root={shards}",
            "data.train_image_size=64",
            "data.eval_image_size=64",
            "data.loader_workers=0",
            "scaling.num_workers=0",
            "scaling.use_gpu=false",
            "optim.batch_size=16",
            f"optim.epochs={epochs}",
            *overrides,
        ],
    )
    torch.manual_seed(0)
    rank = RankDevice(rank=0, world_size=1, device=torch.device("cpu"), autocast_dtype=None, channels_last=False)
    train = build_loader(config.data, "train", rank=0, world_size=1, batch_size=16, seed=0)
    val = build_loader(config.data, "val", rank=0, world_size=1, batch_size=16, seed=0)
    trainee = Trainee.build(build_model(config.model, train.manifest.num_classes), config.optim, len(train), rank)
    curve = []
    for _ in range(epochs):
        train_metrics = train_one_epoch(trainee, train, config, rank)
        val_metrics = evaluate(trainee.model, val, rank, "val")
        record_epoch(trainee.state, {**train_metrics, **val_metrics})
        curve.append((train_metrics["train/loss"], val_metrics["val/top1"]))
    return curve


@pytest.mark.slow
@pytest.mark.parametrize(
    "model", ["model.name=alexnet", "model.name=alexnet_tv model.init=kaiming"], ids=["alexnet", "alexnet_tv"]
)
def test_both_alexnets_learn_under_the_shipped_recipe(four_class_shards, model):
    """Before: alexnet's first SGD steps overshot (paper init, 10 classes: first epoch 11.06 against ln 10) and
    then both AlexNets sat at chance (25 % here for all 12 epochs): their inits shrink the signal ~1e-3-fold by
    the logits. Now the first epoch stays near ln 4 and the last two are clearly above chance (twice it; measured
    97.5 / 87.5 % and 77.5 / 77.5 %)."""
    curve = _recipe_run(four_class_shards, 12, *model.split())
    assert curve[0][0] < math.log(4) + 0.05, curve
    assert min(top1 for _, top1 in curve[-2:]) >= 50.0, curve


@pytest.mark.slow
def test_the_papers_initialisation_overshoots_under_the_same_recipe(four_class_shards):
    """Why the recipe does not use it (its biases of 1 make fc7's 4096 outputs all ~1): the measurement the
    recipe's comment cites, kept honest."""
    assert _recipe_run(four_class_shards, 1, "model.init=paper")[0][0] > 2 * math.log(4)

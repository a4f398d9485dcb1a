"""Models: the 2012 AlexNet, torchvision's AlexNet and ResNets, built from one `ModelConfig`.

    from pipeline.config import ModelConfig
    from pipeline.train.models import build_model
    model = build_model(ModelConfig(name="resnet50", dropout=0.2), num_classes=1000)

Features for retrieval (the input of the final linear layer) come from `pipeline.features.extract`.

Parameter counts at 1000 classes (checked in tests/test_models.py):
    alexnet     62,378,344  (single tower; the paper's two-GPU grouped net has 60,965,224, "60 million")
    alexnet_tv  61,100,840      resnet18  11,689,512      resnet34  21,797,672
    resnet50    25,557,032      resnet101 44,549,160      resnet152 60,192,808
"""

from __future__ import annotations

import torch
import torchvision
from torch import nn

from pipeline.config import INITS_BY_MODEL, MODEL_NAMES, ModelConfig
from pipeline.config import MIN_IMAGE_SIZE as CONFIG_MIN_IMAGE_SIZE
from pipeline.data.transforms import IMAGENET_STD
from pipeline.errors import ConfigError

_RESNET_BUILDERS = {
    "resnet18": torchvision.models.resnet18,
    "resnet34": torchvision.models.resnet34,
    "resnet50": torchvision.models.resnet50,
    "resnet101": torchvision.models.resnet101,
    "resnet152": torchvision.models.resnet152,
}
_TORCHVISION_WEIGHTS = {
    "alexnet_tv": torchvision.models.AlexNet_Weights.IMAGENET1K_V1,
    "resnet18": torchvision.models.ResNet18_Weights.IMAGENET1K_V1,
    "resnet34": torchvision.models.ResNet34_Weights.IMAGENET1K_V1,
    "resnet50": torchvision.models.ResNet50_Weights.IMAGENET1K_V1,
    "resnet101": torchvision.models.ResNet101_Weights.IMAGENET1K_V1,
    "resnet152": torchvision.models.ResNet152_Weights.IMAGENET1K_V1,
}

# Published ImageNet-1k validation accuracy, percent: (top-1, top-5). Torchvision's figures are single 224 px
# centre crops of its V1 reference-recipe weights, read from the weights' metadata (nothing is downloaded).
# The paper's figure (Krizhevsky et al. 2012, Table 2, one CNN: 40.7 % top-1 / 18.2 % top-5 error) averages
# ten crops (4 corners + centre, and their mirrors), so it flatters the net by roughly 1-2 points against
# single-crop numbers.
PUBLISHED_TOP1_TOP5: dict[str, tuple[float, float]] = {
    "alexnet": (100.0 - 40.7, 100.0 - 18.2),
    **{
        name: (weights.meta["_metrics"]["ImageNet-1K"]["acc@1"], weights.meta["_metrics"]["ImageNet-1K"]["acc@5"])
        for name, weights in _TORCHVISION_WEIGHTS.items()
    },
}
# Top-5 error, percent: the 2012 winning entry (7 CNNs, test set) and a trained human annotator
# (Russakovsky et al. 2015, on 1,500 test images).
ALEXNET_ENSEMBLE_TOP5_ERROR = 15.3
HUMAN_TOP5_ERROR = 5.1

# Smallest square input side per architecture (pipeline.config owns the rule; ResNets accept any side).
MIN_IMAGE_SIZE: dict[str, int] = {**{name: 1 for name in _RESNET_BUILDERS}, **CONFIG_MIN_IMAGE_SIZE}


class AlexNet2012(nn.Module):
    """The ILSVRC-2012 winner (Krizhevsky, Sutskever & Hinton 2012) as one ungrouped tower.

    The paper split conv2, conv4 and conv5 across two GPUs (groups=2); one device needs no split, so every
    conv here sees all input channels (1.4 M more parameters, same feature-map shapes). At 224 px input:
    conv1 96@55x55 -> pool 27 -> conv2 256@27 -> pool 13 -> conv3 384, conv4 384, conv5 256 @13 -> pool 6,
    then FC 4096 -> FC 4096 -> FC classes, with dropout before the first two FC layers. The paper quotes
    224 px input, but an 11x11 stride-4 conv only yields 55x55 with 2 px of padding (227 px without).
    The adaptive average pool is the identity at 224 px and lets smaller training sides (>= 63 px) work.
    """

    def __init__(
        self, num_classes: int = 1000, dropout: float = 0.5, local_response_norm: bool = True, init: str = "paper"
    ) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 96, kernel_size=11, stride=4, padding=2),
            nn.ReLU(inplace=True),
            _response_norm() if local_response_norm else nn.Identity(),
            nn.MaxPool2d(kernel_size=3, stride=2),  # overlapping: window 3 > stride 2
            nn.Conv2d(96, 256, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            _response_norm() if local_response_norm else nn.Identity(),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(256, 384, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 384, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        # Same layout as torchvision's AlexNet classifier: fc7 (the retrieval features) feeds the last layer.
        self.classifier = nn.Sequential(
            nn.Dropout(p=dropout),
            nn.Linear(256 * 6 * 6, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(p=dropout),
            nn.Linear(4096, 4096),
            nn.ReLU(inplace=True),
            nn.Linear(4096, num_classes),
        )
        # The paper's net sees mean-subtracted pixels in 0-255 units (section 2: "subtracting the mean activity over
        # the training set from each pixel"); the loader hands every model ImageNet-normalised input, ~58x smaller.
        # Its N(0, 0.01) initialisation is sized for the paper's scale: at unit scale each of the 8 layers shrinks
        # the signal (conv1 0.01 x sqrt(363) = 0.19, ...), the logits are the biases' alone (~1e-3 signal) and SGD
        # at the paper's lr sits at chance for hundreds of steps. Multiplying by 255 x std restores the paper's
        # input exactly. Not learned, but saved with the weights: they only mean something at the scale they were
        # trained at (weights saved before it existed load with scale 1, see _load_from_state_dict).
        self.register_buffer("pixel_scale", 255.0 * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        if init not in INITS_BY_MODEL["alexnet"]:
            raise ConfigError(f"model.init = {init!r}: alexnet takes {' or '.join(INITS_BY_MODEL['alexnet'])}")
        self._initialise(init)

    def _initialise(self, init: str) -> None:
        # paper (section 5): weights N(0, 0.01); biases 1 in conv2, conv4, conv5 and the hidden FC layers (to
        # give the ReLUs positive inputs early on), 0 elsewhere.
        # reference: BVLC Caffe's bvlc_alexnet (models/bvlc_alexnet/train_val.prototxt): the same but fc6 and fc7
        # weights N(0, 0.005) and those biases 0.1. Why it matters: with biases 1, fc7's 4096 outputs all start
        # near 1, so one SGD step moves every logit by ~lr x 4096 x (p - y): at lr 0.01 on 10 classes the first
        # steps overshoot (loss 3 -> 8 -> 16) and the ReLUs die at chance. With 1000 classes each class's
        # (p - y) is ~100x smaller, which is why the paper's ImageNet run survived it.
        convs = [module for module in self.features if isinstance(module, nn.Conv2d)]
        linears = [module for module in self.classifier if isinstance(module, nn.Linear)]
        raised_bias = 1.0 if init == "paper" else 0.1
        biased = {id(convs[1]), id(convs[3]), id(convs[4]), id(linears[0]), id(linears[1])}
        narrow = {id(linears[0]), id(linears[1])} if init == "reference" else set()
        for layer in convs + linears:
            nn.init.normal_(layer.weight, mean=0.0, std=0.005 if id(layer) in narrow else 0.01)
            nn.init.constant_(layer.bias, raised_bias if id(layer) in biased else 0.0)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # Checkpoints written before the input scale was part of this net were trained on the loader's unit-scale
        # input: they keep it, so a resumed run or a prediction computes what those weights learned.
        state_dict.setdefault(prefix + "pixel_scale", torch.ones(1, 3, 1, 1))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.avgpool(self.features(images * self.pixel_scale))
        return self.classifier(torch.flatten(features, 1))


def _response_norm() -> nn.LocalResponseNorm:
    # Paper: b = a / (k + alpha * sum of a^2 over n = 5 adjacent channels)^beta, k = 2, alpha = 1e-4,
    # beta = 0.75. PyTorch divides alpha by n inside the sum, so pass n * alpha to get the paper's layer.
    size = 5
    return nn.LocalResponseNorm(size=size, alpha=1e-4 * size, beta=0.75, k=2.0)


def build_model(config: ModelConfig, num_classes: int) -> nn.Module:
    """A freshly initialised (never pretrained) classifier for `num_classes` classes.

    ResNets use `zero_init_residual=True`: the last BatchNorm of each residual block starts at gamma 0, so each
    block starts as the identity, which helps large-batch training (Goyal et al. 2017). With dropout > 0 the
    classifier becomes `Sequential(Dropout, Linear)` (keys `fc.1.*`); with 0 it stays torchvision's plain `fc`.
    """
    if config.name not in MODEL_NAMES:
        raise ConfigError(f"model.name = {config.name!r}: unknown model; choose one of {', '.join(MODEL_NAMES)}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ConfigError(f"num_classes = {num_classes!r}: a classifier needs an integer number of classes >= 2")
    if config.name == "alexnet":
        return AlexNet2012(
            num_classes, config.dropout, config.local_response_norm, config.init or INITS_BY_MODEL["alexnet"][0]
        )
    if config.name == "alexnet_tv":
        model = torchvision.models.alexnet(weights=None, num_classes=num_classes, dropout=config.dropout)
        return kaiming_initialised(model) if config.init == "kaiming" else model
    model = _RESNET_BUILDERS[config.name](weights=None, num_classes=num_classes, zero_init_residual=True)
    if config.dropout > 0:
        model.fc = nn.Sequential(nn.Dropout(p=config.dropout), model.fc)
    return model


def kaiming_initialised(model: nn.Module) -> nn.Module:
    """torchvision's VGG initialisation (He et al. 2015, fan-out, for convs; N(0, 0.01) for FC; biases 0).
    Why alexnet_tv needs it: PyTorch's layer defaults (kaiming-uniform with a = sqrt(5)) keep 1/sqrt(6) of the
    signal's variance per ReLU layer, ~1e-3 of it at the logits after 8 layers, and under SGD at AlexNet's lr it
    sits at chance for hundreds of steps (4 generated classes: val top-1 25 % after 12 epochs; 77.5 % with this)."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0.0, 0.01)
            nn.init.zeros_(module.bias)
    return model


def count_parameters(model: nn.Module) -> int:
    """All parameters, trainable or frozen; torchvision's `num_params` counts the same way."""
    return sum(parameter.numel() for parameter in model.parameters())

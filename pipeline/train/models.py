"""Models: the 2012 AlexNet, torchvision's AlexNet and ResNets, built from one `ModelConfig`.

    from pipeline.config import ModelConfig
    from pipeline.train.models import build_model
    model = build_model(ModelConfig(name="resnet50", dropout=0.2), num_classes=1000)

Features for retrieval (the input of the final linear layer) come from `pipeline.features.extract`.

Which builder, inits and smallest input each architecture has is the model table's (`pipeline.architectures`).
Parameter counts at 1000 classes (checked in tests/train/test_models.py):
    alexnet     62,378,344  (single tower; the paper's two-GPU grouped net has 60,965,224, "60 million")
    alexnet_tv  61,100,840      resnet18  11,689,512      resnet34  21,797,672
    resnet50    25,557,032      resnet101 44,549,160      resnet152 60,192,808
"""

from __future__ import annotations

import torch
import torchvision
from torch import nn

from pipeline.architectures import ARCHITECTURES, architecture
from pipeline.config import ModelConfig
from pipeline.data.transforms import IMAGENET_STD
from pipeline.errors import ConfigError


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
        inits = ARCHITECTURES["alexnet"].inits
        if init not in inits:
            raise ConfigError(f"model.init = {init!r}: alexnet takes {' or '.join(inits)}")
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
    entry = architecture(config.name)  # the model table; unknown names fail naming the choices
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ConfigError(f"num_classes = {num_classes!r}: a classifier needs an integer number of classes >= 2")
    if entry.torchvision_name is None:  # the 2012 net, which torchvision does not have
        return AlexNet2012(num_classes, config.dropout, config.local_response_norm, config.init or entry.default_init)
    if entry.family == "alexnet":
        model = torchvision.models.get_model(
            entry.torchvision_name, weights=None, num_classes=num_classes, dropout=config.dropout
        )
        return kaiming_initialised(model) if config.init == "kaiming" else model
    model = torchvision.models.get_model(
        entry.torchvision_name, weights=None, num_classes=num_classes, zero_init_residual=True
    )
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

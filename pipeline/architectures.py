"""The model table: one entry per architecture holding every fact about it, which everything else reads.

After timm's `register_model`: the config validates names, inits and input sizes against it, the builders
(`pipeline.train.models`) build from it, the feature extractor (`pipeline.features.extract`) names its layer from
it and evaluation reports its published accuracy. Plain data without torch, so the config can import it.

    from pipeline.architectures import architecture
    architecture("resnet50").feature_dim  # 2048: the width of its retrieval features
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipeline.errors import ConfigError


@dataclass(frozen=True)
class Architecture:
    name: str  # model.name in the config
    family: Literal["alexnet", "resnet"]  # what model.dropout and model.local_response_norm mean for it
    # The builder: torchvision.models.get_model(torchvision_name); None: the project's own (AlexNet2012).
    torchvision_name: str | None
    # Smallest square input side, pixels, that survives the network's strides and pools (1: any side).
    min_image_size: int
    # model.init choices, the first the model's own (what model.init = None means); empty: no choice.
    inits: tuple[str, ...]
    feature_layer: str  # the layer whose output is the retrieval feature: the final linear layer's input
    feature_dim: int  # that feature's width
    # Published ImageNet-1k validation accuracy, percent: (top-1, top-5).
    published_top1_top5: tuple[float, float]

    @property
    def default_init(self) -> str | None:
        return self.inits[0] if self.inits else None


# Both AlexNets need three 3x3 max-pools to see at least 3x3 maps: 63 px; ResNets end in adaptive pooling.
# AlexNet's features are fc7 (the second 4096-d fully connected layer, after its ReLU: the layer the 2012 paper's
# retrieval figure used), a ResNet's the global average pool over its last stage.
# Published figures: the paper's (Krizhevsky et al. 2012, Table 2, one CNN: 40.7 % top-1 / 18.2 % top-5 error)
# averages ten crops (4 corners + centre, and their mirrors), so it flatters the net by roughly 1-2 points against
# single-crop numbers; torchvision's are single 224 px centre crops of its V1 reference-recipe weights, as their
# metadata states them (tests/test_architectures.py checks they agree).
# Columns: name, family, torchvision_name, min_image_size, inits, feature_layer, feature_dim, published_top1_top5.
_TABLE = (
    Architecture("alexnet", "alexnet", None, 63, ("paper", "reference"), "fc7", 4096, (100.0 - 40.7, 100.0 - 18.2)),
    Architecture("alexnet_tv", "alexnet", "alexnet", 63, ("torchvision", "kaiming"), "fc7", 4096, (56.522, 79.066)),
    Architecture("resnet18", "resnet", "resnet18", 1, (), "avgpool", 512, (69.758, 89.078)),
    Architecture("resnet34", "resnet", "resnet34", 1, (), "avgpool", 512, (73.314, 91.42)),
    Architecture("resnet50", "resnet", "resnet50", 1, (), "avgpool", 2048, (76.13, 92.862)),
    Architecture("resnet101", "resnet", "resnet101", 1, (), "avgpool", 2048, (77.374, 93.546)),
    Architecture("resnet152", "resnet", "resnet152", 1, (), "avgpool", 2048, (78.312, 94.046)),
)
ARCHITECTURES: dict[str, Architecture] = {entry.name: entry for entry in _TABLE}

# Views of the table for the code that needs one fact of every model.
MODEL_NAMES = tuple(ARCHITECTURES)
MIN_IMAGE_SIZE = {name: entry.min_image_size for name, entry in ARCHITECTURES.items()}
PUBLISHED_TOP1_TOP5 = {name: entry.published_top1_top5 for name, entry in ARCHITECTURES.items()}
# Top-5 error, percent: the 2012 winning entry (7 CNNs, test set) and a trained human annotator
# (Russakovsky et al. 2015, on 1,500 test images).
ALEXNET_ENSEMBLE_TOP5_ERROR = 15.3
HUMAN_TOP5_ERROR = 5.1


def architecture(name: str) -> Architecture:
    """The table's entry for model.name = `name`; unknown names fail naming the choices."""
    if name not in ARCHITECTURES:
        raise ConfigError(f"model.name = {name!r}: unknown model; choose one of {', '.join(MODEL_NAMES)}")
    return ARCHITECTURES[name]

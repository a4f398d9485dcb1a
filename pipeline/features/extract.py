"""A trained classifier's learned features: the input of its final linear layer, L2-normalised.

That is AlexNet's fc7 (the second 4096-d fully connected layer after its ReLU, the layer the 2012 paper's
retrieval figure used) and a ResNet's globally pooled vector (512-d for resnet18/34, 2048-d deeper): the layer
and width the model table (`pipeline.architectures`) records. Any model the registry or a checkpoint gives works,
with no retraining: eager modules get a forward hook, exported (pt2) graphs get one extra output node. One forward
pass yields both the logits and the features, so evaluation scores and embeds in the same pass.

    net = with_features(load_model_for_inference(source, config).model)
    logits, features = net(images)  # features: (batch, dim), unit length
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.architectures import ARCHITECTURES
from pipeline.errors import ModelSourceError


@dataclass(frozen=True)
class FeatureSpec:
    """What an embedding is: recorded with the logged model and beside every embedding and index."""

    architecture: str
    layer: str
    dim: int


class WithFeatures(nn.Module):
    """`model` with a second output: (logits, L2-normalised features). Takes over `model` (an exported graph gets
    an extra output node in place), so use the wrapper, not the original, afterwards."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        graph = _exported_graph(model)
        if graph is not None:
            self.dim, self._exported = _add_feature_output(graph), True
        else:
            self._last = _last_linear(model)
            self.dim, self._exported = self._last.in_features, False

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._exported:
            joined = self.model(images)  # (batch, dim + classes): features first
            features, logits = joined[:, : self.dim], joined[:, self.dim :]
        else:
            # Hooked for this call only: the same module may go on training, and must not keep capturing.
            captured: list[torch.Tensor] = []
            handle = self._last.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0]))
            try:
                logits = self.model(images)
            finally:
                handle.remove()
            (features,) = captured
        return logits, nn.functional.normalize(features.float().flatten(1), dim=1)


@torch.no_grad()
def embed_pass(net: WithFeatures, loader, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, labels) of every valid sample one pass of `loader` yields (masked slots dropped), on the CPU.
    With a rank's exactly-once loader this is that rank's share of the split."""
    net.eval()
    from pipeline.data.transforms import normalize_batch

    features, labels = [], []
    for batch in loader:
        valid = batch.labels >= 0
        if not bool(valid.any()):
            continue
        _, batch_features = net(normalize_batch(batch.images[valid], device))
        features.append(batch_features.cpu())
        labels.append(batch.labels[valid])
    if not features:
        return torch.empty(0, net.dim), torch.empty(0, dtype=torch.int64)
    return torch.cat(features), torch.cat(labels)


def with_features(model: nn.Module) -> WithFeatures:
    return model if isinstance(model, WithFeatures) else WithFeatures(model)


def feature_spec(architecture: str, model: nn.Module) -> FeatureSpec:
    """The features `with_features(model)` gives, found without changing `model`."""
    if architecture not in ARCHITECTURES:
        raise ModelSourceError(f"architecture {architecture!r}: no feature layer is defined for it")
    layer = ARCHITECTURES[architecture].feature_layer
    if isinstance(model, WithFeatures):
        return FeatureSpec(architecture, layer, model.dim)
    graph = _exported_graph(model)
    dim = _final_linear_node(graph)[1] if graph is not None else _last_linear(model).in_features
    return FeatureSpec(architecture, layer, dim)


def _exported_graph(model: nn.Module) -> torch.fx.GraphModule | None:
    """The torch.export graph inside an inference wrapper (pipeline.inference.loading), if that is what it is."""
    graph = getattr(model, "graph", None)
    # ExportedProgram.module() replaces train/eval with methods that raise; an eager module keeps nn.Module's.
    return graph if isinstance(graph, torch.fx.GraphModule) and "train" in vars(graph) else None


def _last_linear(model: nn.Module) -> nn.Linear:
    linears = [module for module in model.modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise ModelSourceError(f"{type(model).__name__}: no linear classifier layer to take features from")
    return linears[-1]


def _add_feature_output(graph: torch.fx.GraphModule) -> int:
    """Make an exported classifier return cat(features, logits); return the feature width.

    The graph's output structure (one tensor) stays as it is, which the exported module's calling convention
    checks; the features ride in front of the logits and `WithFeatures` splits them off again.
    """
    last, dim = _final_linear_node(graph)
    output = next(node for node in graph.graph.nodes if node.op == "output")
    features = last.args[0]
    with graph.graph.inserting_before(output):
        joined = graph.graph.call_function(torch.ops.aten.cat.default, ([features, last], 1))
    output.args = ((joined,),)
    graph.graph.lint()
    graph.recompile()
    return dim


def _final_linear_node(graph: torch.fx.GraphModule) -> tuple[torch.fx.Node, int]:
    """The graph's last linear layer, which must produce its output, and that layer's input width."""
    nodes = list(graph.graph.nodes)
    linears = [node for node in nodes if node.op == "call_function" and node.target == torch.ops.aten.linear.default]
    output = next(node for node in nodes if node.op == "output")
    if not linears or output.args[0] != (linears[-1],):
        raise ModelSourceError(
            "the exported model does not end in a linear classifier layer; features are taken from that layer's input"
        )
    last = linears[-1]
    features, weight = last.args[0], last.args[1]
    if weight.op == "get_attr":
        return last, int(operator.attrgetter(weight.target)(graph).shape[1])  # dotted: fc.1.weight
    return last, int(features.meta["val"].shape[1])

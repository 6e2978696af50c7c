"""torch.fx view of a model with Brevitas layers kept whole: the one graph that channel removal,
sparsity groups and the integer-ONNX writer all read."""

from __future__ import annotations

import brevitas.nn as qnn
from torch import fx, nn

from rcdeploy.models.common import Normalize

# Modules traced as single nodes. torch.nn modules are leaves already; Brevitas and our own are not.
LEAF_TYPES: tuple[type[nn.Module], ...] = (qnn.QuantConv2d, qnn.QuantLinear, qnn.QuantReLU, qnn.QuantIdentity,
                                           Normalize)


class QuantTracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, LEAF_TYPES) or super().is_leaf_module(m, module_qualified_name)


def trace(model: nn.Module) -> fx.GraphModule:
    """Symbolic trace with Brevitas layers as leaf modules (their `target` is the module's name)."""
    graph = QuantTracer().trace(model)
    return fx.GraphModule(model, graph)

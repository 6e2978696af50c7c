"""Activation-scale initialization: a few forward passes that set every learned activation scale."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from brevitas.graph.calibrate import calibration_mode
from torch import nn

from rcdeploy.quant.spec import weight_layers


def calibrate_activations(model: nn.Module, batches: Iterable[torch.Tensor]) -> None:
    """Collect activation statistics (Brevitas calibration mode) and freeze them as initial scales.

    Done once before training, so attacks run in eval mode from the very first step see
    initialized quantizers.
    """
    init_weight_scales(model)
    was_training = model.training
    with torch.no_grad(), calibration_mode(model):
        for x in batches:
            model(x)
    model.train(was_training)


def init_weight_scales(model: nn.Module) -> None:
    """Initialize learned per-channel weight scales from the current weights where not yet done.

    Brevitas initializes a PARAMETER_FROM_STATS scale on the first weight quantization; calibration
    disables weight quantization, so do it explicitly (an uninitialized scale is also left out of
    state_dict, which would make checkpoints incomplete).
    """
    with torch.no_grad():
        for _, layer in weight_layers(model):
            if layer.weight_quant.is_quant_enabled:
                layer.quant_weight()

"""Activation-scale initialization: a few forward passes that set every learned activation scale."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from brevitas.graph.calibrate import calibration_mode
from torch import nn


def calibrate_activations(model: nn.Module, batches: Iterable[torch.Tensor]) -> None:
    """Collect activation statistics (Brevitas calibration mode) and freeze them as initial scales.

    Done once before training, so attacks run in eval mode from the very first step see
    initialized quantizers.
    """
    was_training = model.training
    with torch.no_grad(), calibration_mode(model):
        for x in batches:
            model(x)
    model.train(was_training)

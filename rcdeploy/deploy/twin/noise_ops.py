"""RandomNormalLike / RandomUniformLike: the noise of stochastic models, or its mean (`noise=False`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from rcdeploy.deploy.twin.registry import _Node, _op

if TYPE_CHECKING:
    from rcdeploy.deploy.twin.core import OnnxTwin


@_op("RandomNormalLike")
def _random_normal_like(tw: OnnxTwin, node: _Node, ins: list) -> torch.Tensor:
    x = ins[0]
    mean, scale = float(node.attrs.get("mean", 0.0)), float(node.attrs.get("scale", 1.0))
    if not tw.noise:
        return torch.full_like(x, mean, dtype=torch.float32)  # the noise's expectation (zeros for mean 0)
    return torch.randn_like(x, dtype=torch.float32) * scale + mean


@_op("RandomUniformLike")
def _random_uniform_like(tw: OnnxTwin, node: _Node, ins: list) -> torch.Tensor:
    x = ins[0]
    low, high = float(node.attrs.get("low", 0.0)), float(node.attrs.get("high", 1.0))
    if not tw.noise:
        return torch.full_like(x, (low + high) / 2, dtype=torch.float32)
    return torch.rand_like(x, dtype=torch.float32) * (high - low) + low

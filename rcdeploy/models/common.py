"""Pieces every model shares: input normalization inside the model, and the quantized head."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from rcdeploy.quant.spec import QuantSpec


class Normalize(nn.Module):
    """(x - mean) / std per channel, so models take [0, 1] images and attacks work in image units."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class InputStem(nn.Module):
    """Normalize, then quantize the input (signed, per-tensor) before the first conv."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], quant: QuantSpec) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.quant = quant.act_signed()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant(self.normalize(x))


class PoolHead(nn.Module):
    """Global average pool -> re-quantize (unsigned) -> flatten -> linear classifier."""

    def __init__(self, in_features: int, num_classes: int, quant: QuantSpec) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.quant = quant.act_unsigned()
        self.fc = quant.linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.quant(self.pool(x)), 1))


class ConvBNAct(nn.Sequential):
    """Conv -> BatchNorm -> quantized ReLU (or a signed re-quantizer when `relu` is False)."""

    def __init__(self, quant: QuantSpec, in_ch: int, out_ch: int, kernel: int = 3, stride: int = 1,
                 groups: int = 1, relu: bool = True) -> None:
        super().__init__(
            quant.conv(in_ch, out_ch, kernel, stride=stride, groups=groups),
            nn.BatchNorm2d(out_ch),
            quant.relu() if relu else quant.act_signed(),
        )

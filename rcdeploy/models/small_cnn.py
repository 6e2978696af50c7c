"""A small CNN for 8x8 (digits) and 28x28 (MNIST-like) inputs."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from rcdeploy.models.common import ConvBNAct, InputStem, PoolHead
from rcdeploy.models.registry import register_model
from rcdeploy.quant.spec import QuantSpec


class SmallCNN(nn.Module):
    """conv-conv-pool-conv(-pool for >= 16 px)-GAP-fc; widths (32, 64, 128) at width 1."""

    def __init__(self, *, num_classes: int, in_chans: int, mean: Sequence[float], std: Sequence[float],
                 quant: QuantSpec, input_size: int = 8, width: float = 1.0) -> None:
        super().__init__()
        c1, c2, c3 = (max(1, round(c * width)) for c in (32, 64, 128))
        self.stem = InputStem(mean, std, quant)
        layers: list[nn.Module] = [ConvBNAct(quant, in_chans, c1), ConvBNAct(quant, c1, c2), nn.MaxPool2d(2),
                                   ConvBNAct(quant, c2, c3)]
        if input_size >= 16:
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.head = PoolHead(c3, num_classes, quant)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(self.stem(x)))


@register_model("small_cnn")
def small_cnn(**kwargs) -> SmallCNN:
    return SmallCNN(**kwargs)

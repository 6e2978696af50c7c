"""MobileNetV2 (Sandler et al. 2018) with a CIFAR stem (stride-1 first conv, first two strides removed).

ReLU6 becomes a quantized ReLU: its learned saturation plays the clipping role, and an unsigned
quantizer is exactly what the integer graph can express without a Clip node.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from rcdeploy.models.common import ConvBNAct, InputStem, PoolHead
from rcdeploy.models.registry import register_model
from rcdeploy.quant.spec import QuantSpec

# (expansion t, channels c, repeats n, stride s); CIFAR: strides of the 2nd stage and stem set to 1
CIFAR_SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                  (6, 160, 3, 2), (6, 320, 1, 1))


def _make_divisible(v: float, divisor: int = 8) -> int:
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


class InvertedResidual(nn.Module):
    def __init__(self, quant: QuantSpec, in_ch: int, out_ch: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = in_ch * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(ConvBNAct(quant, in_ch, hidden, 1))
        layers += [ConvBNAct(quant, hidden, hidden, 3, stride, groups=hidden),
                   ConvBNAct(quant, hidden, out_ch, 1, relu=False)]
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and in_ch == out_ch
        self.out_quant = quant.act_signed() if self.use_residual else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.out_quant is not None:
            return self.out_quant(x + self.conv(x))
        return self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, *, num_classes: int, in_chans: int, mean: Sequence[float], std: Sequence[float],
                 quant: QuantSpec, width: float = 1.0, input_size: int = 32) -> None:
        super().__init__()
        stem_ch = _make_divisible(32 * width)
        last_ch = _make_divisible(1280 * max(1.0, width))
        self.stem = nn.Sequential(InputStem(mean, std, quant), ConvBNAct(quant, in_chans, stem_ch, 3, 1))
        blocks: list[nn.Module] = []
        in_ch = stem_ch
        for t, c, n, s in CIFAR_SETTINGS:
            out_ch = _make_divisible(c * width)
            for i in range(n):
                blocks.append(InvertedResidual(quant, in_ch, out_ch, s if i == 0 else 1, t))
                in_ch = out_ch
        blocks.append(ConvBNAct(quant, in_ch, last_ch, 1))
        self.features = nn.Sequential(*blocks)
        self.head = PoolHead(last_ch, num_classes, quant)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(self.stem(x)))


@register_model("mobilenetv2")
def mobilenetv2(**kwargs) -> MobileNetV2:
    return MobileNetV2(**kwargs)

"""CIFAR ResNets (He et al. 2016): ResNet-20/32/56, 16-32-64 channels, 1x1-conv downsampling shortcuts."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from rcdeploy.models.common import ConvBNAct, InputStem, PoolHead
from rcdeploy.models.registry import register_model
from rcdeploy.quant.spec import QuantSpec


class BasicBlock(nn.Module):
    """conv-bn-relu-conv-bn(-signed quant) + shortcut -> quantized ReLU.

    Both branches reach the add already quantized, so the exported graph is an integer add
    (QLinearAdd) whose unsigned output quantizer is the ReLU.
    """

    def __init__(self, quant: QuantSpec, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.conv1 = ConvBNAct(quant, in_ch, out_ch, 3, stride)
        self.conv2 = ConvBNAct(quant, out_ch, out_ch, 3, 1, relu=False)
        self.shortcut = (ConvBNAct(quant, in_ch, out_ch, 1, stride, relu=False)
                         if stride != 1 or in_ch != out_ch else nn.Identity())
        self.relu = quant.relu()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv2(self.conv1(x)) + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, *, depth: int, num_classes: int, in_chans: int, mean: Sequence[float],
                 std: Sequence[float], quant: QuantSpec, width: float = 1.0, input_size: int = 32) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError("CIFAR ResNet depth must be 6n+2")
        n = (depth - 2) // 6
        widths = [max(1, round(c * width)) for c in (16, 32, 64)]
        self.stem = nn.Sequential(InputStem(mean, std, quant), ConvBNAct(quant, in_chans, widths[0]))
        blocks: list[nn.Module] = []
        in_ch = widths[0]
        for stage, out_ch in enumerate(widths):
            for i in range(n):
                blocks.append(BasicBlock(quant, in_ch, out_ch, 2 if stage > 0 and i == 0 else 1))
                in_ch = out_ch
        self.blocks = nn.Sequential(*blocks)
        self.head = PoolHead(in_ch, num_classes, quant)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


@register_model("resnet20")
def resnet20(**kwargs) -> CifarResNet:
    return CifarResNet(depth=20, **kwargs)


@register_model("resnet32")
def resnet32(**kwargs) -> CifarResNet:
    return CifarResNet(depth=32, **kwargs)


@register_model("resnet56")
def resnet56(**kwargs) -> CifarResNet:
    return CifarResNet(depth=56, **kwargs)

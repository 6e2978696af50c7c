"""PreAct ResNet-18 (He et al. 2016b), CIFAR stem: the standard model of the adversarial-training literature."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from rcdeploy.models.common import InputStem, PoolHead
from rcdeploy.models.registry import register_model
from rcdeploy.quant.spec import QuantSpec


class PreActBlock(nn.Module):
    """bn-relu-conv-bn-relu-conv + shortcut. The residual stream is re-quantized (signed) after the add.

    BatchNorm precedes its conv here, so export keeps it as a per-channel float affine op: folding it
    into the next conv is not exact at zero-padded borders.
    """

    def __init__(self, quant: QuantSpec, in_ch: int, out_ch: int, stride: int,
                 noise: nn.Module | None = None) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.relu1 = quant.relu()
        self.conv1 = quant.conv(in_ch, out_ch, 3, stride)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.relu2 = quant.relu()
        self.conv2 = quant.conv(out_ch, out_ch, 3, 1)
        self.shortcut = quant.conv(in_ch, out_ch, 1, stride) if stride != 1 or in_ch != out_ch else None
        self.noise = noise if noise is not None else nn.Identity()  # EnResNet's Feynman-Kac noise goes here
        self.out_quant = quant.act_signed()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu1(self.bn1(x))
        shortcut = self.shortcut(pre) if self.shortcut is not None else x
        out = self.conv2(self.relu2(self.bn2(self.conv1(pre))))
        return self.out_quant(self.noise(out + shortcut))


def preact_stages(quant: QuantSpec, in_ch: int, widths: Sequence[int], num_blocks: Sequence[int],
                  make_block: Callable[..., nn.Module] = PreActBlock) -> tuple[nn.Sequential, int]:
    """Stages of PreAct blocks (stride 2 at the start of every stage but the first); returns them and
    the output channels. `make_block(quant, in_ch, out_ch, stride)` builds one block."""
    blocks: list[nn.Module] = []
    for stage, (out_ch, n) in enumerate(zip(widths, num_blocks)):
        for i in range(n):
            blocks.append(make_block(quant, in_ch, out_ch, 2 if stage > 0 and i == 0 else 1))
            in_ch = out_ch
    return nn.Sequential(*blocks), in_ch


class PreActResNet(nn.Module):
    def __init__(self, *, num_blocks: Sequence[int], num_classes: int, in_chans: int, mean: Sequence[float],
                 std: Sequence[float], quant: QuantSpec, width: float = 1.0, input_size: int = 32) -> None:
        super().__init__()
        widths = [max(1, round(c * width)) for c in (64, 128, 256, 512)]
        self.stem = nn.Sequential(InputStem(mean, std, quant), quant.conv(in_chans, widths[0], 3),
                                  quant.act_signed())
        self.blocks, in_ch = preact_stages(quant, widths[0], widths, num_blocks)
        self.bn = nn.BatchNorm2d(in_ch)
        self.relu = quant.relu()
        self.head = PoolHead(in_ch, num_classes, quant)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.relu(self.bn(self.blocks(self.stem(x)))))


@register_model("preact_resnet18")
def preact_resnet18(**kwargs) -> PreActResNet:
    return PreActResNet(num_blocks=(2, 2, 2, 2), **kwargs)

"""EnResNet (Wang et al., "ResNets Ensemble via the Feynman-Kac Formalism", arXiv 1811.10745).

An ensemble of n PreAct ResNets whose logits are averaged; every residual block adds Gaussian noise
`noise * std(out) * N(0, 1)` to its output, in training *and* at test time (the reference code keeps
it on: the noise is the diffusion term of the Feynman-Kac formalism, not a regulariser). Names:
`en{n}resnet{depth}` (e.g. en2resnet20, en5resnet20); `enresnet{depth}` is n = 5; `preact_resnet20`
is one member without noise, the paper's ResNet20 baseline.

Three choices, and why:

* std is taken per image (over C, H, W); the reference takes it over the whole batch tensor. Per image,
  a deployed model's answer for one image does not depend on its batch-mates; at batch 1 both agree.
* The noise module is invisible to torch.fx tracing (its forward returns x for a Proxy), so the graph
  that channel tracing reads is the deterministic network. That is sound for channel removal: in PreAct
  blocks the residual stream is read only by BatchNorms (zeroed with their channel) and identity
  shortcuts, so noise on a removed channel never reaches the output. It does reach the per-image std,
  though: a shrunk block keeps the channel count it had (`stat_channels`) and counts the removed
  channels as zeros, which they are before their first noise (see `FeynmanKacNoise.std`; it neglects the
  noise identity shortcuts carry on them from earlier blocks: on a digits ensemble the shrunk model's
  per-draw logit spread is within 2% of the masked one's, 15% off without the count). The integer
  export traces the module as a leaf and writes the noise as ONNX ops around a RandomNormalLike
  (`rcdeploy.export.qdq`); `export --no-noise` drops it instead (noted in the sidecar).
* The ensemble mean is written as a plain sum (the integer graph has Add, not Mul): each member's head
  stores its weights, bias and weight scale divided by n, and gradient hooks scale their gradients by
  1/n^2, so SGD (with momentum and weight decay) follows exactly the trajectory of the averaged form.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import fx, nn

from rcdeploy.models.common import InputStem, PoolHead
from rcdeploy.models.preact_resnet import PreActBlock, preact_stages
from rcdeploy.models.registry import register_model
from rcdeploy.quant.spec import QuantSpec

NOISE = 0.1  # the paper's noise coefficient (std of the injected noise / std of the block output)
DEFAULT_MEMBERS = 5


class FeynmanKacNoise(nn.Module):
    """x + coeff * std(x per image) * N(0, 1), in train and eval mode. The class name ends in 'Noise':
    `rcdeploy export` finds noise modules by that suffix."""

    def __init__(self, coeff: float = NOISE) -> None:
        super().__init__()
        self.coeff = float(coeff)
        self.enabled = True
        # Channels the std is taken over; None: the input's own. Set by channel removal to the count before
        # it, the removed channels counting as zeros (they are exactly zero before their first noise).
        self.stat_channels: int | None = None

    def std(self, x: torch.Tensor) -> torch.Tensor:
        """Per-image std over all but the batch dim (Bessel-corrected, as torch.std), shaped to broadcast."""
        shape = (-1, *([1] * (x.dim() - 1)))
        flat = x.flatten(1)
        missing = self.missing_per_channel(x) * max(0, (self.stat_channels or 0) - x.shape[1])
        if not missing:
            return flat.std(dim=1).view(shape)
        n = flat.shape[1] + missing
        mean = flat.sum(1, keepdim=True) / n
        ss = (flat - mean).square().sum(1, keepdim=True) + missing * mean.square()
        return (ss / (n - 1)).sqrt().view(shape)

    @staticmethod
    def missing_per_channel(x: torch.Tensor) -> int:
        """Elements per image of one channel (what each removed channel adds to the std's count)."""
        return int(torch.Size(x.shape[2:]).numel())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, fx.Proxy) or not self.enabled or self.coeff == 0:
            return x
        return x + self.coeff * self.std(x) * torch.randn_like(x)

    def extra_repr(self) -> str:
        return f"coeff={self.coeff}" + (f", stat_channels={self.stat_channels}" if self.stat_channels else "")


def noise_modules(model: nn.Module) -> list[FeynmanKacNoise]:
    return [m for m in model.modules() if isinstance(m, FeynmanKacNoise)]


def is_stochastic(model: nn.Module) -> bool:
    """Whether the model's forward is random at test time (needs EOT to be attacked and scored)."""
    return any(m.enabled and m.coeff > 0 for m in noise_modules(model))


@contextmanager
def noise_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Turn every noise module off for the block (restored after, also on error)."""
    mods = noise_modules(model)
    before = [m.enabled for m in mods]
    try:
        for m in mods:
            m.enabled = False
        yield model
    finally:
        for m, flag in zip(mods, before):
            m.enabled = flag


class NoisyPreActBlock(PreActBlock):
    """PreActBlock with the Feynman-Kac noise after the residual add, before the residual re-quantizer."""

    def __init__(self, quant: QuantSpec, in_ch: int, out_ch: int, stride: int, noise: float) -> None:
        super().__init__(quant, in_ch, out_ch, stride, noise=FeynmanKacNoise(noise) if noise > 0 else None)


class PreActResNetMember(nn.Module):
    """One PreAct ResNet-(6k+2) (16-32-64 channels) reading the shared quantized input."""

    def __init__(self, quant: QuantSpec, *, depth: int, in_chans: int, num_classes: int, width: float,
                 noise: float) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError("PreAct ResNet depth must be 6k+2 (20, 32, 44, 56, 110)")
        k = (depth - 2) // 6
        widths = [max(1, round(c * width)) for c in (16, 32, 64)]
        self.stem = nn.Sequential(quant.conv(in_chans, widths[0], 3), quant.act_signed())
        self.blocks, in_ch = preact_stages(quant, widths[0], widths, (k, k, k),
                                           lambda *a: NoisyPreActBlock(*a, noise=noise))
        self.bn = nn.BatchNorm2d(in_ch)
        self.relu = quant.relu()
        self.head = PoolHead(in_ch, num_classes, quant)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.relu(self.bn(self.blocks(self.stem(x)))))


def _scale_grad(factor: float):
    def hook(grad: torch.Tensor) -> torch.Tensor:
        return grad * factor

    hook.rcdeploy_ensemble = True  # marks the hook, so it is added once per parameter
    return hook


def _has_scale_hook(p: torch.Tensor) -> bool:
    return any(getattr(h, "rcdeploy_ensemble", False) for h in (p._backward_hooks or {}).values())


class EnResNet(nn.Module):
    """n noisy PreAct ResNets on one normalized, quantized input; logits averaged (see module docstring)."""

    def __init__(self, *, members: int = DEFAULT_MEMBERS, depth: int = 20, num_classes: int, in_chans: int,
                 mean: Sequence[float], std: Sequence[float], quant: QuantSpec, width: float = 1.0,
                 input_size: int = 32, noise: float = NOISE) -> None:
        super().__init__()
        if int(members) < 1:
            raise ValueError("an ensemble needs at least one member")
        if noise < 0:
            raise ValueError("the noise coefficient must be >= 0")
        self.n_members = int(members)
        self.stem = InputStem(mean, std, quant)
        self.members = nn.ModuleList(
            PreActResNetMember(quant, depth=depth, in_chans=in_chans, num_classes=num_classes, width=width,
                               noise=noise) for _ in range(self.n_members))
        if self.n_members > 1:
            with torch.no_grad():
                for m in self.members:
                    m.head.fc.weight.div_(self.n_members)
                    if m.head.fc.bias is not None:
                        m.head.fc.bias.div_(self.n_members)
        self._hook_heads()

    @property
    def first_last_layers(self) -> list[str]:
        """Every member's first conv and classifier: the layers a first/last bit policy should keep wide."""
        return [f"members.{i}.{n}" for i in range(self.n_members) for n in ("stem.0", "head.fc")]

    def _hook_heads(self) -> None:
        """Gradient hooks on each member head's parameters (see the module docstring). Idempotent: layers
        rebuilt by a bit policy after construction get theirs on the next `train()`."""
        if self.n_members == 1:
            return
        factor = 1.0 / self.n_members ** 2
        for m in self.members:
            for p in m.head.fc.parameters():
                if not _has_scale_hook(p):
                    p.register_hook(_scale_grad(factor))

    def train(self, mode: bool = True) -> EnResNet:
        if mode:
            self._hook_heads()
        return super().train(mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        out = None
        for member in self.members:
            z = member(x)
            out = z if out is None else out + z
        return out


def _register(name: str, members: int, depth: int, noise: float = NOISE) -> None:
    def build(**kwargs) -> EnResNet:
        kwargs.setdefault("noise", noise)
        return EnResNet(members=members, depth=depth, **kwargs)

    build.__name__ = name
    register_model(name)(build)


# The depths and ensemble sizes of the papers (other sizes: EnResNet(members=, depth=) directly).
for _depth in (20, 44):
    for _n in (1, 2, 5):
        _register(f"en{_n}resnet{_depth}", _n, _depth)
    _register(f"enresnet{_depth}", DEFAULT_MEMBERS, _depth)
_register("preact_resnet20", 1, 20, noise=0.0)

"""Model registry with uniform constructors (timm style)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from rcdeploy.quant.spec import QuantSpec, apply_bit_policy
from rcdeploy.registry import Registry, drop_none

MODELS: Registry[Callable[..., nn.Module]] = Registry("model")


def register_model(name: str) -> Callable:
    return MODELS.register(name)


def create_model(name: str, *, num_classes: int, in_chans: int, mean: Sequence[float], std: Sequence[float],
                 quant: QuantSpec | None = None, input_size: int | None = None,
                 low_rank: dict[str, Any] | None = None, **kwargs: Any) -> nn.Module:
    """Build a registered model taking [0,1] images; None kwargs fall back to the model's own defaults.

    low_rank: factorized layers (`rcdeploy.models.tucker.factorize`), applied after the bit policy so each
    keeps its dense layer's bits; a checkpoint written after CSTAR's swap rebuilds through it.
    """
    quant = quant or QuantSpec()
    ctor = MODELS.get(name)
    model = ctor(num_classes=num_classes, in_chans=in_chans, mean=tuple(mean), std=tuple(std), quant=quant,
                 **drop_none({"input_size": input_size, **kwargs}))
    apply_bit_policy(model, quant)
    if low_rank:
        from rcdeploy.models.tucker import factorize

        factorize(model, low_rank, quant)
    return model

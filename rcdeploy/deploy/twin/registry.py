"""The op registry: one entry per (domain, op type), filled by the op-family modules as they import.

onnx2torch-style: each family module (quantization, qoperator, conv_pool, linalg_elementwise,
shape_ops, noise_ops) registers its converters with `@_op`; `OnnxTwin` looks nodes up here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from rcdeploy.deploy.twin.core import OnnxTwin


_STD = ""
_MS = "com.microsoft"


@dataclass
class _Node:
    name: str
    op: str
    domain: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)

    def where(self) -> str:
        return f"{self.op} node {self.name!r}" if self.name else f"{self.op} node"


_Op = Callable[["OnnxTwin", _Node, list], Any]
_OPS: dict[tuple[str, str], _Op] = {}


def _op(*names: str, domain: str = _STD) -> Callable[[_Op], _Op]:
    def add(fn: _Op) -> _Op:
        for n in names:
            _OPS[(domain, n)] = fn
        return fn

    return add


def supported_ops() -> list[str]:
    """Names of the ONNX ops the twin interprets (`domain:Op` outside the default domain)."""
    return sorted(f"{d}:{o}" if d else o for d, o in _OPS)


def _arg(ins: list, i: int) -> torch.Tensor | None:
    return ins[i] if i < len(ins) else None

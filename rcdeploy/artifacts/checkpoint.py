"""The checkpoint: what `train` hands to `export` (and to itself on `--resume`), one self-describing file.

Model spec + weights + the run's settings + dataset meta + where the run stands. Written atomically
(temp file + rename) and read with torch.load(weights_only=True): a checkpoint is data, never code.
The file is a plain dict of these fields (format `rcdeploy-checkpoint`, version 1), so files written
before this class existed load unchanged.
"""

from __future__ import annotations

import dataclasses
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from rcdeploy import validate as V
from rcdeploy.errors import UsageError
from rcdeploy.io import atomic_write_bytes

if TYPE_CHECKING:
    import torch
    from torch import nn

    from rcdeploy.quant.spec import QuantSpec

FORMAT = "rcdeploy-checkpoint"
VERSION = 1

# What a checkpoint or model card must hold for `DatasetMeta.from_dict` (the one schema both files share).
DATASET_META_CHECK = V.mapping({
    "name": V.text(max_len=4096),
    "num_classes": V.integer(2, 1_000_000),
    "classes": V.list_of(V.one_of(V.text(), V.integer(), expected="a class name"), max_len=1_000_000),
    "shape": V.list_of(V.integer(1, 65_536), min_len=3, max_len=3),
    "mean": V.list_of(V.number(), max_len=64),
    "std": V.list_of(V.number(0, lo_open=True), max_len=64),
    "crop_padding": V.integer(0, 1024),
    "hflip": V.boolean,
    "default_eps": V.number(0, 1, lo_open=True),
}, required=("name", "num_classes", "shape"))


def _tensor(v: Any, path: str) -> Any:
    import torch

    if not isinstance(v, torch.Tensor):
        raise V.Invalid(path, f"expected a tensor, got {V.shown(v)}")
    return v


def _schema() -> V.Check:
    """The fields export and resume read; a file with the header but another shape fails here, by name."""
    return V.mapping({
        "format": V.text(),
        "version": V.integer(0),
        "model": V.mapping({"name": V.text(max_len=200), "kwargs": V.mapping(max_len=1000), "quant": V.mapping()},
                           required=("name", "kwargs", "quant")),
        "state_dict": V.mapping(values=_tensor, max_len=1_000_000),
        "optimizer": V.optional(V.mapping({"state": V.anything, "param_groups": V.list_of(V.mapping())},
                                          required=("state", "param_groups"))),
        "config": V.mapping(),
        "dataset": DATASET_META_CHECK,
        "position": V.list_of(V.integer(0), min_len=2, max_len=2),
        "partial_epoch": V.optional(V.mapping({k: V.number(0) for k in ("loss", "correct", "seen", "time")})),
        "history": V.list_of(V.mapping({"epoch": V.integer(1)}, required=("epoch",)), max_len=100_000),
        "best": V.optional(V.mapping()),
        "eps": V.optional(V.number(0, 1)),
        "bit_allocation": V.optional(V.mapping()),
    }, required=("model", "state_dict", "config", "dataset"))


def model_spec(name: str, quant: QuantSpec, **kwargs: Any) -> dict[str, Any]:
    """What `build_model` needs to rebuild the architecture: registry name, constructor kwargs, bits."""
    return {"name": name, "kwargs": dict(kwargs), "quant": quant.to_dict()}


def build_model(spec: dict[str, Any], source: str = "model spec") -> nn.Module:
    """The architecture `spec` names; settings the model does not take are one UsageError naming them."""
    from rcdeploy.models import create_model
    from rcdeploy.quant.spec import QuantSpec

    kwargs = dict(spec["kwargs"])
    try:
        quant = QuantSpec.from_dict(spec["quant"])
        return create_model(spec["name"], quant=quant, **kwargs)
    except UsageError as e:
        raise UsageError(f"{source}: {e}") from None
    except (TypeError, ValueError, KeyError, RuntimeError, AttributeError) as e:
        # create_model is a registry call: a foreign or edited spec fails inside a constructor
        raise UsageError(f"{source}: model {spec['name']!r} cannot be built from its settings "
                         f"(model.kwargs / model.quant: {V.clip(str(e))})") from None


def load_weights(model: nn.Module, state_dict: dict[str, torch.Tensor], path: str | Path) -> None:
    try:
        model.load_state_dict(state_dict)
    except (RuntimeError, KeyError, TypeError) as e:
        raise UsageError(f"checkpoint {path}: state_dict does not fit the model it names "
                         f"({V.clip(str(e)) or type(e).__name__})") from None


def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save into memory, then an atomic write (temp file + rename) over `path`."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def read_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """The validated file as a dict; anything else (missing, corrupt, foreign, newer) is a UsageError."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"checkpoint not found: {path} (train one with `rcdeploy train`, or pass its path)")
    try:
        raw = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many types for truncated / foreign pickles
        raise UsageError(f"{path} is not a readable rcdeploy checkpoint ({type(e).__name__}: "
                         f"{V.clip(str(e)) or 'unreadable'})") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise UsageError(f"{path} is not an rcdeploy checkpoint (no '{FORMAT}' header); "
                         "export and resume read only files written by `rcdeploy train`")
    if isinstance(raw.get("version"), int) and raw["version"] > VERSION:
        raise UsageError(f"{path} was written by a newer rcdeploy (checkpoint version {raw['version']})")
    return V.validate(raw, _schema(), f"checkpoint {path}")


@dataclass
class Checkpoint:
    """One training checkpoint. `model`, `config`, `dataset` keep the file's own dicts (the model spec,
    `TrainConfig.to_dict()`, `DatasetMeta.to_dict()`); other stages read them through the properties."""

    FORMAT: ClassVar[str] = FORMAT
    VERSION: ClassVar[int] = VERSION

    model: dict[str, Any]
    state_dict: dict[str, Any]
    config: dict[str, Any]
    dataset: dict[str, Any]
    optimizer: dict[str, Any] | None = None
    position: list[int] = field(default_factory=lambda: [0, 0])  # (epochs done, batches into the next)
    partial_epoch: dict[str, float] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)  # one metrics line per finished epoch
    best: dict[str, Any] | None = None
    metrics: dict[str, Any] = field(default_factory=dict)  # the last epoch's line
    eps: float | None = None  # the training eps actually used (the dataset default when the config had none)
    sparsity_state: dict[str, Any] | None = None
    sparsity: dict[str, Any] | None = None
    plugins_state: dict[str, Any] = field(default_factory=dict)
    bit_allocation: dict[str, Any] | None = None  # --bits auto: per-layer bits, norms, errors (train/auto_bits.py)
    rcdeploy: str | None = None  # version that wrote it
    path: Path | None = field(default=None, compare=False)  # where it was read from

    # ------------------------------------------------------------------------------------------ file
    def to_dict(self) -> dict[str, Any]:
        """The file's dict, key for key as version 1 writes it."""
        return {"format": FORMAT, "version": VERSION, "rcdeploy": self.rcdeploy, "model": self.model,
                "state_dict": self.state_dict, "optimizer": self.optimizer, "sparsity_state": self.sparsity_state,
                "sparsity": self.sparsity, "plugins_state": self.plugins_state, "config": self.config,
                "dataset": self.dataset, "position": list(self.position), "partial_epoch": self.partial_epoch,
                "history": self.history, "best": self.best, "metrics": self.metrics, "eps": self.eps,
                "bit_allocation": self.bit_allocation}

    def save(self, path: str | Path) -> None:
        atomic_save(self.to_dict(), path)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], path: str | Path | None = None) -> Checkpoint:
        names = {f.name for f in dataclasses.fields(cls)} - {"path"}
        values = {k: raw[k] for k in names if raw.get(k) is not None}
        return cls(**values, path=Path(path) if path is not None else None)

    @classmethod
    def load(cls, path: str | Path, map_location: Any = "cpu") -> Checkpoint:
        """Read and validate; a missing, corrupt, foreign or newer file is one UsageError line."""
        return cls.from_dict(read_checkpoint(path, map_location), path)

    # --------------------------------------------------------------------------------- typed reads
    @property
    def source(self) -> str:
        return f"checkpoint {self.path}" if self.path is not None else "checkpoint"

    @property
    def model_name(self) -> str:
        return str(self.model["name"])

    @property
    def quant(self) -> QuantSpec:
        from rcdeploy.quant.spec import QuantSpec

        return QuantSpec.from_dict(self.model["quant"])

    @property
    def dataset_name(self) -> str | None:
        return self.dataset.get("name")

    @property
    def input_shape(self) -> tuple[int, ...] | None:
        shape = self.dataset.get("shape")
        return tuple(int(s) for s in shape) if shape is not None else None

    @property
    def data_dir(self) -> str | None:
        return self.config.get("data_dir")

    @property
    def training_eps(self) -> float | str | None:
        """The eps training used: the one it resolved, else the recipe's (possibly None)."""
        return self.eps if self.eps is not None else self.config.get("eps")

    def build_model(self, map_location: Any = "cpu") -> nn.Module:
        """The model with its weights, in eval mode."""
        model = build_model(self.model, self.source)
        load_weights(model, self.state_dict, self.path or "checkpoint")
        return model.to(map_location).eval()

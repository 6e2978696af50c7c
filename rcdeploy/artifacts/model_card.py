"""The model card `model.json`: what `export` hands to `bench` (or an app) beside the ONNX file.

One name throughout: the *model card*, stored as `<stem>.json` next to `<stem>.onnx`. Format
`rcdeploy-model-card`, version 1. Sections stay the dicts they are in the file (a free-form
payload per section); what another stage reads, it reads through the typed properties below.

A card for a foreign model may be written by hand: `{"dataset": {"name": "cifar10"}}` is enough
(no format header). A card with another format's header, or a newer version, is refused.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from rcdeploy import validate as V
from rcdeploy.artifacts._json import jsonable
from rcdeploy.errors import UsageError
from rcdeploy.io import atomic_write_text

FORMAT = "rcdeploy-model-card"
VERSION = 1
_FRACTION = V.one_of(V.number(0, 1, lo_open=True), V.text(max_len=64), expected="a number or a fraction like 8/255")


def _schema() -> V.Check:
    """The fields bench reads, with their types: a card that names a dataset must get them right."""
    return V.mapping({
        "format": V.text(max_len=200),
        "version": V.integer(0),
        "dataset": V.mapping({"name": V.text(max_len=4096),
                              "shape": V.optional(V.list_of(V.integer(1, 65_536), min_len=3, max_len=3))},
                             required=("name",)),
        "input": V.optional(V.mapping({"range": V.optional(V.list_of(V.number(), min_len=2, max_len=2))})),
        "training": V.optional(V.mapping({"eps": V.optional(_FRACTION),
                                          "config": V.optional(V.mapping({"data_dir": V.optional(V.text())}))})),
        "eps": V.optional(_FRACTION),
        "model": V.optional(V.mapping({"name": V.optional(V.text())})),
    }, required=("dataset",))


@dataclass
class ModelCard:
    """model.json. Field order is the file's key order."""

    FORMAT: ClassVar[str] = FORMAT
    VERSION: ClassVar[int] = VERSION

    model: dict[str, Any] | None = None  # the checkpoint's model spec (name, kwargs, quant)
    # DatasetMeta.to_dict() of the training data (name, shape, classes, mean, std, ...); required in a file
    dataset: dict[str, Any] = field(default_factory=dict)
    input: dict[str, Any] | None = None  # name, shape, dtype, layout, range, normalization
    output: dict[str, Any] | None = None
    training: dict[str, Any] | None = None  # adv, eps, bits, sparsity, the whole config
    training_metrics: dict[str, Any] | None = None
    layers: list[dict[str, Any]] | None = None  # per weight layer: bits, storage, channels, params, MACs
    activations: Any = None
    float_affine_ops: Any = None
    files: dict[str, Any] | None = None  # file name -> format, bytes, ...
    storage: str | None = None
    bits: dict[str, Any] | None = None  # trained / exported / per layer
    channels_kept: dict[str, Any] | None = None
    params: int | None = None
    macs: int | None = None
    verification: dict[str, Any] | None = None
    kernels: dict[str, Any] | None = None
    runtime: str | None = None
    openvino: dict[str, Any] | None = None
    exported_on: dict[str, Any] | None = None
    pruning: dict[str, Any] | None = None
    ptq: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    versions: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # keys this version does not know, kept as they are
    path: Path | None = field(default=None, compare=False)  # where it was read from

    # ------------------------------------------------------------------------------------------ file
    def to_dict(self) -> dict[str, Any]:
        body = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("extra", "path")}
        return jsonable({"format": FORMAT, "version": VERSION, **body, **self.extra})

    def text(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, self.text())

    @classmethod
    def from_dict(cls, raw: Any, source: str = "model card", path: str | Path | None = None) -> ModelCard:
        """Validate and wrap a parsed card; a foreign or newer file, or a field of the wrong type, is a UsageError."""
        if isinstance(raw, dict) and raw.get("format", FORMAT) != FORMAT:
            raise UsageError(f"{source} is not an rcdeploy model card (format {V.shown(raw.get('format'))}, "
                             f"expected '{FORMAT}')")
        if isinstance(raw, dict) and isinstance(raw.get("version"), int) and raw["version"] > VERSION:
            raise UsageError(f"{source} was written by a newer rcdeploy (model card version {raw['version']})")
        raw = V.validate(raw, _schema(), source)
        names = {f.name for f in dataclasses.fields(cls)} - {"extra", "path"}
        values = {k: v for k, v in raw.items() if k in names}
        extra = {k: v for k, v in raw.items() if k not in names and k not in ("format", "version")}
        return cls(**values, extra=extra, path=Path(path) if path is not None else None)

    @classmethod
    def load(cls, path: str | Path) -> ModelCard:
        """Read a model card; unreadable, foreign, newer or mistyped is one UsageError line naming the file."""
        p = Path(path)
        try:
            raw = json.loads(V.read_text_file(p, "model card"))
        except (RecursionError, json.JSONDecodeError) as e:
            raise UsageError(f"model card {p} is not readable JSON ({V.clip(str(e)) or type(e).__name__})") from None
        return cls.from_dict(raw, f"model card {p}", p)

    @staticmethod
    def path_for(model_path: str | Path) -> Path:
        """model.onnx -> model.json."""
        return Path(model_path).with_suffix(".json")

    # --------------------------------------------------------------------------------- typed reads
    @property
    def dataset_name(self) -> str:
        return str(self.dataset["name"])

    @property
    def input_shape(self) -> list[int] | None:
        return self.dataset.get("shape")

    @property
    def input_range(self) -> list[float] | None:
        return (self.input or {}).get("range")

    @property
    def training_eps(self) -> float | str | None:
        """The eps training used (a number, or a fraction string in hand-written cards)."""
        return (self.training or {}).get("eps", self.extra.get("eps"))

    @property
    def data_dir(self) -> str | None:
        return ((self.training or {}).get("config") or {}).get("data_dir")

    @property
    def architecture(self) -> str | None:
        return (self.model or {}).get("name")

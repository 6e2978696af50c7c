"""The bench report: what `bench` hands to `compare`, CSV files and scripts (`bench --json`).

Format `rcdeploy-bench`, version 1. Keys carry their unit (`_ms`, `_s`, `_bytes`, `_pct`, `_per_s`);
`settings` holds everything the figures depend on. The sections stay the dicts they are in the file
(free-form payloads that grow with new measurements); `compare` and the CSV row read the headline
figures through the typed properties below.
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

FORMAT = "rcdeploy-bench"
VERSION = 1


def _schema() -> V.Check:
    """The fields `compare` and the CSV row read, with their types (the report's one schema)."""
    num = V.optional(V.number())
    return V.mapping({
        "format": V.text(), "version": V.integer(0),
        "model": V.optional(V.mapping({"path": V.optional(V.text()), "name": V.optional(V.text())})),
        "settings": V.optional(V.mapping({
            "dataset": V.optional(V.text()), "target": V.optional(V.text()), "eps": num,
            "samples": V.optional(V.integer(0)),
            "attacks": V.optional(V.list_of(V.mapping({"name": V.text()}, required=("name",)))),
        })),
        "size": V.optional(V.mapping({k: num for k in ("file_bytes", "params", "macs", "integer_mac_share_pct")})),
        "latency": V.optional(V.mapping({"batches": V.optional(V.list_of(V.mapping({
            "batch_size": V.optional(V.integer(1)), "p50_ms": num, "img_per_s": num})))})),
        "accuracy": V.optional(V.mapping({"clean_acc_pct": num, "worst_case_acc_pct": num})),
    }, required=("format",))


@dataclass
class BenchReport:
    """One `rcdeploy bench` run. Field order is the file's key order."""

    FORMAT: ClassVar[str] = FORMAT
    VERSION: ClassVar[int] = VERSION

    created: str | None = None
    model: dict[str, Any] = field(default_factory=dict)  # path, name, sha256, model card, input, classes
    settings: dict[str, Any] = field(default_factory=dict)  # dataset, eps, attacks, target, isa, runtime, cpu, ...
    size: dict[str, Any] = field(default_factory=dict)
    latency: dict[str, Any] | None = None
    accuracy: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # steps that failed after others finished
    units: dict[str, str] = field(default_factory=dict)
    versions: dict[str, Any] = field(default_factory=dict)
    time_s: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # keys this version does not know, kept as they are

    # ------------------------------------------------------------------------------------------ file
    def to_dict(self) -> dict[str, Any]:
        body = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return jsonable({"format": FORMAT, "version": VERSION, **body, **self.extra})

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, default=str) + "\n")

    @classmethod
    def from_dict(cls, raw: Any, source: str = "report") -> BenchReport:
        """Validate and wrap a parsed report; a foreign or newer one, or a mistyped field, is a UsageError."""
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise UsageError(f"{source} is not an rcdeploy bench report; write one with "
                             "`rcdeploy bench MODEL.onnx --json FILE`")
        if isinstance(raw.get("version"), int) and raw["version"] > VERSION:
            raise UsageError(f"{source} was written by a newer rcdeploy (bench report version {raw['version']})")
        raw = V.validate(raw, _schema(), source)
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        values = {k: v for k, v in raw.items() if k in names and (v is not None or k == "latency")}
        extra = {k: v for k, v in raw.items() if k not in names and k not in ("format", "version")}
        return cls(**values, extra=extra)

    @classmethod
    def load(cls, path: str | Path) -> BenchReport:
        """Read a report; missing, not JSON, foreign, newer or mistyped is one UsageError line."""
        p = Path(path)
        if not p.is_file():
            raise UsageError(f"report {str(p)!r} is not a file; pass JSON files written by `rcdeploy bench --json`")
        try:
            raw = json.loads(V.read_text_file(p, "report"))
        except (RecursionError, json.JSONDecodeError) as e:
            raise UsageError(f"report {str(p)!r} is not JSON ({V.clip(str(e)) or type(e).__name__}); pass "
                             "`bench --json` output") from None
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise UsageError(f"report {str(p)!r} is not an rcdeploy bench report; write one with "
                             "`rcdeploy bench MODEL.onnx --json FILE`")
        return cls.from_dict(raw, f"report {p}")

    # --------------------------------------------------------------------------------- typed reads
    @property
    def model_path(self) -> str | None:
        return self.model.get("path")

    @property
    def model_name(self) -> str | None:
        return self.model.get("name")

    @property
    def file_sha256(self) -> str | None:
        return self.model.get("file_sha256")

    @property
    def dataset(self) -> str | None:
        return self.settings.get("dataset")

    @property
    def target(self) -> str | None:
        return self.settings.get("target")

    @property
    def eps(self) -> float | None:
        return self.settings.get("eps")

    @property
    def step(self) -> float | None:
        return self.settings.get("step")

    @property
    def samples(self) -> int | None:
        return self.settings.get("samples")

    @property
    def attack_names(self) -> list[str]:
        return [a["name"] for a in self.settings.get("attacks") or []]

    @property
    def file_bytes(self) -> int | None:
        return self.size.get("file_bytes")

    @property
    def params(self) -> int | None:
        return self.size.get("params")

    @property
    def macs(self) -> int | None:
        return self.size.get("macs")

    @property
    def integer_mac_share_pct(self) -> float | None:
        return self.size.get("integer_mac_share_pct")

    @property
    def latency_batches(self) -> list[dict[str, Any]]:
        return list((self.latency or {}).get("batches") or [])

    @property
    def first_batch(self) -> dict[str, Any]:
        """Latency of the first (smallest) batch size, or {} when latency was not measured."""
        batches = self.latency_batches
        return batches[0] if batches else {}

    @property
    def clean_acc_pct(self) -> float | None:
        return self.accuracy.get("clean_acc_pct")

    @property
    def worst_case_acc_pct(self) -> float | None:
        """Per-image worst case over clean and every attack run (None when no attack ran)."""
        return self.accuracy.get("worst_case_acc_pct")

    @property
    def robust(self) -> list[dict[str, Any]]:
        """One row per attack: name, family, robust_acc_pct, max_perturbation, twin_agreement_pct, ..."""
        return list(self.accuracy.get("robust") or [])

    @property
    def twin(self) -> dict[str, Any]:
        return dict(self.accuracy.get("twin") or {})

    @property
    def flags(self) -> list[str]:
        return list(self.accuracy.get("flags") or [])

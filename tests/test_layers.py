"""The import rules of ../shared/DESIGN.md, kept by a test: the stages are peers on shared floors.

Every module's imports are read with `ast` (module-level and function-level alike: a lazy import is still
a dependency) and mapped to rcdeploy's top-level parts. The rules:

- export imports neither deploy nor train; deploy imports neither train nor models (it reads only the
  ONNX file and its model card);
- a floor (runtime, artifacts, quant, models, attacks, data, errors, io, validate, registry, names,
  units, robustness, distributed)
  imports no stage (train, export, deploy) and not the training recipe (config);
- nothing imports cli (the command line sits on top of the Python API, never under it), except an
  entry point: a `__main__.py` (`python -m rcdeploy.train` for torchrun) is the command line too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "rcdeploy"
STAGES = {"train", "export", "deploy"}
FLOORS = {"runtime", "artifacts", "quant", "models", "attacks", "data", "errors", "io", "validate", "registry",
          "names", "units", "robustness", "distributed"}
FORBIDDEN = {
    "export": {"deploy", "train", "config"},
    "deploy": {"train", "models", "config"},
    **{floor: STAGES | {"config"} for floor in FLOORS},
}


def _part(module: str) -> str | None:
    """'rcdeploy.deploy.bench' -> 'deploy'; None outside rcdeploy (or the package itself)."""
    parts = module.split(".")
    return parts[1] if parts[0] == "rcdeploy" and len(parts) > 1 else None


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every rcdeploy module `path` imports (relative imports resolved; `from rcdeploy import x` -> rcdeploy.x)."""
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)  # `from rcdeploy import train` names a part
    return {m for m in found if m == "rcdeploy" or m.startswith("rcdeploy.")}


def import_graph() -> dict[str, set[str]]:
    """part -> the parts it imports (itself excluded)."""
    graph: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        own = _part(_module_name(path)) or "rcdeploy"
        targets = {_part(m) for m in imports_of(path)} - {None, own}
        graph.setdefault(own, set()).update(t for t in targets if t is not None)
    return graph


def broken(own: str | None, target: str) -> bool:
    """Whether a module of part `own` may not import `target`."""
    part = _part(target)
    if part is None or part == own:
        return False
    return part == "cli" or part in FORBIDDEN.get(own or "", set())


def violations() -> list[str]:
    return [f"{path.relative_to(PACKAGE.parent)} imports {target}"
            for path in sorted(PACKAGE.rglob("*.py"))
            for target in sorted(imports_of(path)) if broken(_part(_module_name(path)), target)
            and not (path.name == "__main__.py" and _part(target) == "cli")]


def test_import_rules_hold() -> None:
    assert violations() == []


def test_every_part_is_classified() -> None:
    """A new top-level module must be placed as a stage, a floor or a top (cli, config, the package's API)."""
    known = STAGES | FLOORS | {"cli", "config", "api", "rcdeploy"}
    assert set(import_graph()) <= known


@pytest.mark.parametrize("own, target, bad", [
    ("export", "rcdeploy.deploy.bench", True),
    ("export", "rcdeploy.train.checkpoint", True),
    ("export", "rcdeploy.runtime.session", False),
    ("deploy", "rcdeploy.models", True),
    ("deploy", "rcdeploy.artifacts.model_card", False),
    ("quant", "rcdeploy.cli", True),
    ("artifacts", "rcdeploy.export.qdq", True),
    ("train", "rcdeploy.config", False),
    ("runtime", "rcdeploy.config", True),
])
def test_the_rules(own: str, target: str, bad: bool) -> None:
    """The checker itself, on imports that must and must not be reported."""
    assert broken(own, target) is bad

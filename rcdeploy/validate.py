"""One validation layer for every file a user hands to rcdeploy: recipes, checkpoints, sidecars, bench reports.

A schema is a tree of small checks (`integer`, `number`, `text`, `list_of`, `mapping`, ...); `validate`
runs one on parsed data and turns the first mismatch into a single `UsageError` line that names the file
and the field, e.g. `recipe r.yaml: epochs: expected an integer >= 1, got 'abc'`. Parsing guards live here
too: YAML with a bounded expansion (alias bombs) and a size cap on every file read whole.
"""

from __future__ import annotations

import math
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from rcdeploy.errors import UsageError

MAX_TEXT_FILE_BYTES = 16 << 20  # recipes, sidecars, reports: far above any real one, far below a memory problem
MAX_YAML_NODES = 100_000  # expanded node count of a recipe (aliases counted each time they are used)
MAX_SHOWN = 40  # characters of an offending value quoted in an error


class Invalid(Exception):
    """A value that does not fit its schema: `path` is the field (a.b[2]), `message` what was expected."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path, self.message = path, message


Check = Callable[[Any, str], Any]  # (value, field path) -> value (possibly normalized); raises Invalid


def clip(message: str, limit: int = 160) -> str:
    """The first line of `message`, cut at a word boundary (never mid-word) when longer than `limit`."""
    lines = str(message).strip().splitlines()
    first = lines[0] if lines else ""
    if len(first) <= limit:
        return first
    head = first[:limit]
    return (head.rsplit(" ", 1)[0] if " " in head else head) + " ..."


def shown(value: Any) -> str:
    """A short repr for error messages, cut at a word boundary rather than mid-word."""
    text = repr(value)
    if len(text) <= MAX_SHOWN:
        return text
    return f"{clip(text, MAX_SHOWN)} ({type(value).__name__})"


def _join(path: str, key: str | int) -> str:
    return f"{path}[{key}]" if isinstance(key, int) else (f"{path}.{key}" if path else str(key))


def _num(v: float) -> str:
    return str(v) if isinstance(v, int) else f"{v:g}"


def _range_text(lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> str:
    parts = []
    if lo is not None:
        parts.append(f"{'>' if lo_open else '>='} {_num(lo)}")
    if hi is not None:
        parts.append(f"{'<' if hi_open else '<='} {_num(hi)}")
    return " and ".join(parts)


def _in_range(v: float, lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> bool:
    return ((lo is None or (v > lo if lo_open else v >= lo))
            and (hi is None or (v < hi if hi_open else v <= hi)))


def integer(lo: int | None = None, hi: int | None = None) -> Check:
    """An int (never a bool or a float) within [lo, hi]."""
    def check(v: Any, path: str) -> int:
        rng = _range_text(lo, hi, False, False)
        if isinstance(v, bool) or not isinstance(v, int):
            raise Invalid(path, f"expected an integer{' ' + rng if rng else ''}, got {shown(v)}")
        if not _in_range(v, lo, hi, False, False):
            raise Invalid(path, f"must be {rng}, got {v}")
        return v
    return check


def number(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
           hi_open: bool = False) -> Check:
    """A finite int or float (never a bool, NaN or inf) within the range; returned as given."""
    def check(v: Any, path: str) -> float:
        rng = _range_text(lo, hi, lo_open, hi_open)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise Invalid(path, f"expected a finite number{' ' + rng if rng else ''}, got {shown(v)}")
        if not _in_range(float(v), lo, hi, lo_open, hi_open):
            raise Invalid(path, f"must be {rng}, got {_num(v)}")
        return v
    return check


def text(choices: Sequence[str] | None = None, max_len: int = 4096) -> Check:
    def check(v: Any, path: str) -> str:
        if not isinstance(v, str):
            raise Invalid(path, f"expected a string, got {shown(v)}")
        if len(v) > max_len:
            raise Invalid(path, f"is {len(v)} characters long, at most {max_len}")
        if choices is not None and v not in choices:
            raise Invalid(path, f"must be one of {', '.join(choices)}, got {shown(v)}")
        return v
    return check


def boolean(v: Any, path: str) -> bool:
    if not isinstance(v, bool):
        raise Invalid(path, f"expected true or false, got {shown(v)}")
    return v


def anything(v: Any, path: str) -> Any:
    return v


def optional(inner: Check) -> Check:
    """None, or what `inner` accepts."""
    def check(v: Any, path: str) -> Any:
        return None if v is None else inner(v, path)
    return check


def one_of(*alternatives: Check, expected: str) -> Check:
    """The first alternative that accepts the value; else one message saying what was `expected`."""
    def check(v: Any, path: str) -> Any:
        for alt in alternatives:
            try:
                return alt(v, path)
            except Invalid:
                continue
        raise Invalid(path, f"expected {expected}, got {shown(v)}")
    return check


def list_of(item: Check, min_len: int = 0, max_len: int = 10_000) -> Check:
    def check(v: Any, path: str) -> list[Any]:
        if not isinstance(v, (list, tuple)):
            raise Invalid(path, f"expected a list, got {shown(v)}")
        if not min_len <= len(v) <= max_len:
            size = f"exactly {min_len}" if min_len == max_len else f"{min_len} to {max_len}"
            raise Invalid(path, f"expected a list of {size} items, got {len(v)}")
        return [item(x, _join(path, i)) for i, x in enumerate(v)]
    return check


def mapping(fields: Mapping[str, Check] | None = None, *, values: Check | None = None,
            required: Sequence[str] = (), max_len: int = 100_000) -> Check:
    """A dict with string keys; listed `fields` checked when present (`required` ones must be), other
    keys checked by `values` when given and kept as they are otherwise (files may carry more than we read)."""
    def check(v: Any, path: str) -> dict[str, Any]:
        if not isinstance(v, Mapping):
            raise Invalid(path, f"expected a mapping (key: value), got {shown(v)}")
        if len(v) > max_len:
            raise Invalid(path, f"has {len(v)} entries, at most {max_len}")
        out = {}
        for key in required:
            if key not in v:
                raise Invalid(_join(path, key), "is missing")
        for key, x in v.items():
            if not isinstance(key, str):
                raise Invalid(path, f"keys must be strings, got {shown(key)}")
            spec = (fields or {}).get(key, values)
            out[key] = spec(x, _join(path, key)) if spec is not None else x
        return out
    return check


def validate(data: Any, schema: Check, source: str) -> Any:
    """Run `schema` on `data`; a mismatch is one UsageError line: `<source>: <field>: <what was expected>`."""
    try:
        return schema(data, "")
    except Invalid as e:
        raise UsageError(f"{source}: {e}") from None


# ---------------------------------------------------------------------------------- dataclass fields


def check_for_type(hint: Any) -> Check:
    """The check for a type annotation (int, float, str, bool, X | None, int | str, list[float], dict[str, X])."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return anything
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        alts = [check_for_type(a) for a in inner]
        names = " or ".join(_type_name(a) for a in inner)
        core = alts[0] if len(alts) == 1 else one_of(*alts, expected=names)
        return optional(core) if type(None) in args else core
    if origin in (list, Sequence):
        return list_of(check_for_type(args[0]) if args else anything)
    if origin in (dict, Mapping):
        return mapping(values=check_for_type(args[1]) if len(args) == 2 else anything)
    simple = {int: integer(), float: number(), str: text(), bool: boolean}
    if hint in simple:
        return simple[hint]
    raise TypeError(f"no check for type {hint!r}")  # a programming error: a new field type needs a rule here


def _type_name(hint: Any) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        hint, getattr(hint, "__name__", str(hint)))


# ------------------------------------------------------------------------------------------ files


def read_text_file(path: str | Path, what: str, max_bytes: int = MAX_TEXT_FILE_BYTES) -> str:
    """A whole text file, refusing one too large to be what it claims to be, or not UTF-8."""
    p = Path(path)
    try:
        size = p.stat().st_size
        if size > max_bytes:
            raise UsageError(f"{what} {p} is {size:,} bytes, more than the {max_bytes:,} a {what} can be")
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{what} {p} is not UTF-8 text") from None
    except OSError as e:
        raise UsageError(f"cannot read {what} {p} ({e.strerror or type(e).__name__})") from None


def safe_yaml(source: str, name: str) -> Any:
    """yaml.safe_load with the expanded document bounded: an alias bomb (nested aliases that expand to
    billions of nodes) or a recursive alias is refused before anything walks the result."""
    import yaml

    loader = yaml.SafeLoader(source)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node, {}, set(), name)
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"{name}: not valid YAML ({first})") from None
    finally:
        loader.dispose()


def _expanded_size(node: Any, memo: dict[int, int], active: set[int], name: str) -> int:
    """Nodes the document holds once every alias is expanded; shared nodes are counted per use."""
    import yaml

    key = id(node)
    if key in memo:
        return memo[key]
    if key in active:
        raise UsageError(f"{name}: a YAML alias refers to itself (recursive anchors are not allowed)")
    active.add(key)
    size = 1
    if isinstance(node, yaml.SequenceNode):
        size += sum(_expanded_size(child, memo, active, name) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        size += sum(_expanded_size(k, memo, active, name) + _expanded_size(v, memo, active, name)
                    for k, v in node.value)
    active.discard(key)
    if size > MAX_YAML_NODES:
        raise UsageError(f"{name}: the YAML expands to more than {MAX_YAML_NODES:,} values (aliases nested too "
                         "deep); write the values out")
    memo[key] = size
    return size

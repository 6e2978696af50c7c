"""A small named registry, shared by models, attacks, datasets, sparsity methods and quant presets.

An entry is either *registered* (`@REG.register(name)` on the implementation) or *declared*
(`REG.declare(name, "module:attr", kind=..., help=...)`, in a light module such as `rcdeploy.names`).
A declaration makes the name known - to `names()`, to unknown-name errors, to the CLI's choices and
help - without importing its implementation; `get` imports "module" on first use and returns the
registered entry (or `module.attr`). Declarations without a target name a behaviour implemented by
name elsewhere (e.g. the learning-rate schedules); they are known but have nothing to resolve.
tests/test_registries.py checks that every declaration resolves to what it names and that every
registered implementation is declared.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from rcdeploy.errors import UsageError

T = TypeVar("T")


@dataclass(frozen=True)
class Declaration:
    """A name known before its implementation is imported."""

    name: str
    target: str | None  # "package.module:attr"; None: implemented by name, nothing to resolve
    kind: str | None = None  # a category inside the registry (e.g. "channels" or "weights" sparsity)
    help: str = ""  # a few words for help texts

    @property
    def module(self) -> str | None:
        return self.target.partition(":")[0] if self.target else None

    @property
    def attr(self) -> str | None:
        return self.target.partition(":")[2] or None if self.target else None


class Registry(Generic[T]):
    """Maps names to constructors; unknown names raise UsageError listing the known ones.

    `ordered=True` keeps declaration order in `names()` (for short lists whose order the CLI shows),
    else names are sorted.
    """

    def __init__(self, kind: str, *, ordered: bool = False) -> None:
        self.kind = kind
        self.ordered = ordered
        self._entries: dict[str, T] = {}
        self._declared: dict[str, Declaration] = {}

    def declare(self, name: str, target: str | None = None, *, kind: str | None = None, help: str = "") -> None:
        """Make `name` known without importing it; `target` ("module:attr") implements it."""
        if name in self._declared:
            raise ValueError(f"{self.kind} {name!r} declared twice")
        if target is not None and ":" not in target:
            raise ValueError(f"{self.kind} {name!r}: target must read 'module:attr', got {target!r}")
        self._declared[name] = Declaration(name, target, kind, help)

    def register(self, name: str | None = None) -> Callable[[T], T]:
        def add(obj: T) -> T:
            key = name or getattr(obj, "__name__", None)
            if key is None:
                raise ValueError("registry entry needs a name")
            if key in self._entries:
                raise ValueError(f"{self.kind} {key!r} registered twice")
            self._entries[key] = obj
            return obj

        return add

    def unknown(self, name: object) -> UsageError:
        """The error for a name that is not known: it lists the known ones."""
        return UsageError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}")

    def check(self, name: str) -> str:
        """`name` if known (declared or registered), else the unknown-name UsageError; imports nothing."""
        if name not in self:
            raise self.unknown(name)
        return name

    def get(self, name: str) -> T:
        if name in self._entries:
            return self._entries[name]
        decl = self._declared.get(name)
        if decl is None:
            raise self.unknown(name)
        return self._resolve(decl)

    __getitem__ = get

    def _resolve(self, decl: Declaration) -> T:
        if decl.module is None:
            return None  # type: ignore[return-value]  # a name-only declaration: nothing to resolve
        module = importlib.import_module(decl.module)  # registers its entries on import
        if decl.name not in self._entries:
            self._entries[decl.name] = getattr(module, decl.attr) if decl.attr else None  # type: ignore[assignment]
        return self._entries[decl.name]

    def names(self, kind: str | None = None) -> list[str]:
        """Known names (declared or registered); with `kind`, only the declarations of that kind."""
        if kind is not None:
            return [n for n, d in self._declared.items() if d.kind == kind] if self.ordered else sorted(
                n for n, d in self._declared.items() if d.kind == kind)
        known = list(self._declared) + [n for n in self._entries if n not in self._declared]
        return known if self.ordered else sorted(known)

    def declaration(self, name: str) -> Declaration:
        """The declaration of `name` (an undeclared registered name gets a bare one)."""
        if name in self._declared:
            return self._declared[name]
        self.check(name)
        return Declaration(name, None)

    def declarations(self) -> list[Declaration]:
        return list(self._declared.values())

    def registered(self) -> list[str]:
        """Names whose implementation has been imported and registered (for the drift test)."""
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries or name in self._declared

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


def drop_none(kwargs: dict[str, Any]) -> dict[str, Any]:
    """CLI defaults of None must never override a constructor's own defaults (timm's rule)."""
    return {k: v for k, v in kwargs.items() if v is not None}

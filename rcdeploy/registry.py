"""A small named registry, shared by models, attacks, datasets, sparsity methods and quant presets."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from rcdeploy.errors import UsageError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to constructors; unknown names raise UsageError listing the known ones."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

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

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(sorted(self._entries))
            raise UsageError(f"unknown {self.kind} {name!r}; known: {known}") from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


def drop_none(kwargs: dict[str, Any]) -> dict[str, Any]:
    """CLI defaults of None must never override a constructor's own defaults (timm's rule)."""
    return {k: v for k, v in kwargs.items() if v is not None}

"""Every name a user may choose, by kind, in one place that depends on nothing.

The modules that implement a kind fill its registry with entries that carry their traits
(`edgezo.zo.methods` the optimizers, `edgezo.models.catalog` the schemes and
quantizations, `edgezo.tasks.catalog` the templates and objectives, `edgezo.tasks.make`
the tasks). The config validates names against these registries, the CLI's help and
docs/methods.md are generated from them, and no list of names is written anywhere else.

Adding an optimizer, scheme or task is one entry in its module; nothing here changes.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Generic, TypeVar

from edgezo.errors import unknown_choice

T = TypeVar("T")


class Registry(Mapping[str, T], Generic[T]):
    """Names of one kind, in the order they were added, each with its entry. An unknown
    name is a ConfigError that lists the valid ones and the closest match."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T) -> T:
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = entry
        return entry

    def __getitem__(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise self.unknown(name) from None

    def get(self, name: str, default: T | None = None) -> T | None:
        return self._entries.get(name, default)

    def unknown(self, name: str) -> Exception:
        """The error for a name this registry does not hold."""
        return unknown_choice(self.kind, name, list(self._entries))

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._entries)})"


OPTIMIZERS: Registry = Registry("optimizer")
SCHEMES: Registry = Registry("scheme")
QUANTIZATIONS: Registry = Registry("quantization")
TASKS: Registry = Registry("task")
TEMPLATES: Registry = Registry("template")
OBJECTIVES: Registry = Registry("objective")

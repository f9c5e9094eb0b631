"""PROBES: the one registry of check types, type name -> probe module (Config + probe), imported on first use."""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from types import ModuleType

# Every check type, in the order the schema and the error messages list them. Each is the module
# agent/probes/<type>.py. The registry knows every name without importing anything: a module (its pydantic
# model, its client library) is loaded only when a config names its type, so an agent with a memory and a
# disk check never carries the models and drivers of the other fifteen.
TYPES = ("tcp", "http", "memory", "disk", "cpu", "load", "swap", "pressure", "fds", "listen_queue", "process",
         "exec", "file", "tls", "dns", "redis", "postgres")


class Registry(Mapping[str, ModuleType]):
    """type name -> probe module. Iterating and `in` never import; looking a type up imports its module."""

    def __init__(self, types: tuple[str, ...]):
        self._types = types

    def __getitem__(self, name: str) -> ModuleType:
        if name not in self._types:
            raise KeyError(name)
        return importlib.import_module(f"{__name__}.{name}")

    def __contains__(self, name: object) -> bool:
        return name in self._types

    def __iter__(self) -> Iterator[str]:
        return iter(self._types)

    def __len__(self) -> int:
        return len(self._types)


PROBES: Mapping[str, ModuleType] = Registry(TYPES)

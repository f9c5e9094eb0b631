"""PROBES: the one registry of check types, type name -> probe module (Config + probe)."""

from __future__ import annotations

from types import ModuleType

from agent.probes import disk, http, memory, tcp

PROBES: dict[str, ModuleType] = {
    "tcp": tcp,
    "http": http,
    "memory": memory,
    "disk": disk,
}

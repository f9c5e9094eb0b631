"""PROBES: the one registry of check types, type name -> probe module (Config + probe)."""

from __future__ import annotations

from types import ModuleType

from agent.probes import disk, dns, http, memory, postgres, redis, tcp, tls

PROBES: dict[str, ModuleType] = {
    "tcp": tcp,
    "http": http,
    "memory": memory,
    "disk": disk,
    "tls": tls,
    "dns": dns,
    "redis": redis,
    "postgres": postgres,
}

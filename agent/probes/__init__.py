"""PROBES: the one registry of check types, type name -> probe module (Config + probe)."""

from __future__ import annotations

from types import ModuleType

from agent.probes import (
    cpu,
    disk,
    dns,
    exec,
    fds,
    file,
    http,
    listen_queue,
    load,
    memory,
    postgres,
    pressure,
    process,
    redis,
    swap,
    tcp,
    tls,
)

PROBES: dict[str, ModuleType] = {
    "tcp": tcp,
    "http": http,
    "memory": memory,
    "disk": disk,
    "cpu": cpu,
    "load": load,
    "swap": swap,
    "pressure": pressure,
    "fds": fds,
    "listen_queue": listen_queue,
    "process": process,
    "exec": exec,
    "file": file,
    "tls": tls,
    "dns": dns,
    "redis": redis,
    "postgres": postgres,
}

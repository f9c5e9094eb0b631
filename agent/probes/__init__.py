"""PROBES: the one registry of check types, type name -> probe module (Config + probe)."""

from __future__ import annotations

from types import ModuleType

from agent.probes import (
    cpu,
    disk,
    exec,
    fds,
    file,
    http,
    listen_queue,
    load,
    memory,
    pressure,
    process,
    swap,
    tcp,
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
}

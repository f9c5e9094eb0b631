"""Whether a check type's failure is a shared reason (every node sees it) or a local one, by default."""

from __future__ import annotations

from typing import Literal

Scope = Literal["shared", "local"]

# Dependencies every node of a group talks to, and overload signals that rise on every node at once, are
# shared: when they fail, they fail everywhere, and shedding every node would only move the outage to the
# load balancer. The node's own disk, memory, descriptors, processes, files and exec scripts are local.
DEFAULT_SCOPE: dict[str, Scope] = {
    "tcp": "shared", "http": "shared", "tls": "shared", "dns": "shared", "redis": "shared", "postgres": "shared",
    "cpu": "shared", "load": "shared", "pressure": "shared", "listen_queue": "shared",
    "memory": "local", "disk": "local", "swap": "local", "fds": "local", "process": "local", "file": "local",
    "exec": "local",
}


def default_scope(check_type: str) -> Scope:
    """A type this table does not know is local: an unknown reason must never be held up by the fleet."""
    return DEFAULT_SCOPE.get(check_type, "local")

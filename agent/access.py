"""Who a client is: the admin socket (the OS checked its permissions), an address in a list, or anyone."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence
from typing import Any, Protocol

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class Transport(Protocol):
    """What is read of a connection: asyncio's transports, and aiohttp's request.transport, have it."""

    def get_extra_info(self, name: str, default: Any = None) -> Any: ...


def is_unix(transport: Transport | None) -> bool:
    """True for a connection accepted on a unix socket, whoever it is: the file's mode decided who may connect."""
    sock = transport.get_extra_info("socket") if transport is not None else None
    return sock is not None and sock.family == socket.AF_UNIX


def peer(transport: Transport | None) -> Address | None:
    """The client's IP address; an IPv4-mapped IPv6 address (a dual-stack listener) as the IPv4 one."""
    name = transport.get_extra_info("peername") if transport is not None else None
    if not isinstance(name, tuple | list) or not name:
        return None
    try:
        addr = ipaddress.ip_address(str(name[0]).split("%")[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def within(addr: Address | None, networks: Sequence[Network]) -> bool:
    return addr is not None and any(addr in n for n in networks if n.version == addr.version)


def admitted(transport: Transport | None, allow_from: Sequence[Network] | None) -> bool:
    """Whether a new connection may be served at all: any client when there is no allow-list, else only
    one from a listed network. The admin socket is never subject to it."""
    return allow_from is None or is_unix(transport) or within(peer(transport), allow_from)


def trusted(transport: Transport | None, networks: Sequence[Network]) -> bool:
    """May see details without a token: a client of the admin socket, or one from a trusted network.
    Loopback is an address like any other: behind a local proxy every remote client arrives from it."""
    return is_unix(transport) or within(peer(transport), networks)

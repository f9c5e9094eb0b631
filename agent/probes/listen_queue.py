"""listen_queue: a local TCP listener's accept queue is not full and the node is not dropping connections."""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import os
import socket
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from agent.model import Observation
from agent.probes.base import CheckBase, CheckFailed, Context
from agent.probes.blocking import blocking


class Config(CheckBase):
    type: Literal["listen_queue"]
    port: int = Field(ge=1, le=65535, description="the local TCP port to watch")
    host: str | None = Field(default=None, description="only the listener on this address (or a wildcard one)")
    max_fill_percent: float = Field(default=90.0, gt=0, description="accept queue length / backlog above this fails")
    max_drops_per_second: float | None = Field(
        default=None, ge=0, description="node-wide ListenDrops per second above this fails; unset = not checked"
    )

    @field_validator("host")
    @classmethod
    def _ip(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                return str(ipaddress.ip_address(v.strip("[]")))
            except ValueError:
                raise ValueError(f"{v!r} must be an IP address as the listener binds it (no host names)") from None
        return v

    def threshold(self) -> str:
        out = f"accept queue <= {self.max_fill_percent:g}% of backlog"
        if self.max_drops_per_second is not None:
            out += f", listen drops <= {self.max_drops_per_second:g}/s"
        return out


@dataclass(frozen=True, slots=True)
class Listener:
    address: str
    queued: int  # connections the kernel has completed, waiting for accept()
    backlog: int  # the listen() backlog in force (capped at net.core.somaxconn)


# The kernel's socket diagnostics (NETLINK_SOCK_DIAG, what `ss -lnt` reads): for a listening socket
# idiag_rqueue is the accept queue length and idiag_wqueue the backlog. /proc/net/tcp shows the queue
# length too, but not the backlog (its tx_queue column is 0 for a listener), so it can't give a fill.
NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
TCP_LISTEN = 10
NLMSGHDR = struct.Struct("=IHHII")
REQUEST = struct.Struct("=BBBxI48x")  # inet_diag_req_v2: family, protocol, ext, states, a zeroed sockid
MESSAGE = struct.Struct("=BBBB2s2s16s16sI8xIIIII")  # inet_diag_msg


def _dump(family: int) -> list[Listener]:
    out: list[Listener] = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as nl:
        nl.settimeout(2.0)
        body = REQUEST.pack(family, socket.IPPROTO_TCP, 0, 1 << TCP_LISTEN)
        nl.send(NLMSGHDR.pack(NLMSGHDR.size + len(body), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, 1, 0)
                + body)
        while True:
            data = nl.recv(65536)
            offset = 0
            while offset + NLMSGHDR.size <= len(data):
                length, kind, _, _, _ = NLMSGHDR.unpack_from(data, offset)
                if kind == NLMSG_DONE:
                    return out
                if kind == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", data, offset + NLMSGHDR.size)[0]
                    raise OSError(code, os.strerror(code))
                (fam, state, _, _, sport, _, src, _, _, _, rqueue, wqueue, _, _) = MESSAGE.unpack_from(
                    data, offset + NLMSGHDR.size)
                if state == TCP_LISTEN:
                    addr = ipaddress.ip_address(src[:4] if fam == socket.AF_INET else src)
                    out.append(Listener(f"{addr}:{int.from_bytes(sport, 'big')}", rqueue, wqueue))
                if length < NLMSGHDR.size:
                    break
                offset += (length + 3) & ~3


def read_listeners(port: int) -> list[Listener]:
    """Every TCP listener on `port` in this network namespace, IPv4 and IPv6."""
    out = []
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            out += _dump(family)
        except OSError as e:
            if family == socket.AF_INET6 and e.errno in (errno.ENOENT, errno.EAFNOSUPPORT):
                continue  # no IPv6 in this kernel
            raise CheckFailed(f"cannot read socket diagnostics (NETLINK_SOCK_DIAG): {e.strerror or e}",
                              "error") from None
    suffix = f":{port}"
    return [Listener(x.address.removesuffix(suffix), x.queued, x.backlog) for x in out
            if x.address.endswith(suffix)]


def read_drops(proc: Path) -> tuple[int, int]:
    """Node-wide (ListenOverflows, ListenDrops) from /proc/net/netstat's TcpExt lines."""
    lines = (proc / "net" / "netstat").read_text().splitlines()
    for names, values in zip(lines, lines[1:], strict=False):
        if names.startswith("TcpExt:") and values.startswith("TcpExt:"):
            row = dict(zip(names.split()[1:], map(int, values.split()[1:]), strict=False))
            return row.get("ListenOverflows", 0), row.get("ListenDrops", 0)
    raise ValueError(f"{proc / 'net' / 'netstat'} has no TcpExt counters")


def read_all(proc: Path, port: int) -> tuple[list[Listener], tuple[int, int]]:
    return read_listeners(port), read_drops(proc)


def _matches(listener: Listener, host: str | None) -> bool:
    # A wildcard listener (0.0.0.0 or ::) serves every address, so it is the one for any host.
    return host is None or listener.address in (host, "0.0.0.0", "::")


async def probe(cfg: Config, ctx: Context) -> Observation:
    where = f"[{cfg.host}]:{cfg.port}" if cfg.host and ":" in cfg.host else f"{cfg.host or ''}:{cfg.port}"
    label = f"listen_queue {where}"
    try:
        listeners, (overflows, drops) = await blocking(ctx, cfg.name, label, read_all, ctx.proc, cfg.port)
    except CheckFailed as e:
        raise CheckFailed(f"{label}: {e.reason}", e.kind) from None
    now = asyncio.get_running_loop().time()

    key = ("listen_queue", cfg.name)
    previous = ctx.memo.get(key)
    ctx.memo[key] = (now, overflows, drops)
    rates: tuple[float, float] | None = None
    if previous is not None and now > previous[0] and drops >= previous[2] and overflows >= previous[1]:
        elapsed = now - previous[0]
        rates = ((overflows - previous[1]) / elapsed, (drops - previous[2]) / elapsed)

    mine = [x for x in listeners if _matches(x, cfg.host)]
    if not mine:
        raise CheckFailed(f"{label}: nothing is listening", "not_listening")

    def fill(x: Listener) -> float:
        return 100.0 * x.queued / x.backlog if x.backlog else (100.0 if x.queued else 0.0)

    worst = max(mine, key=fill)  # with SO_REUSEPORT or v4 + v6, each socket has its own queue
    percent = round(fill(worst), 2)
    values = [("queued", float(worst.queued), "count"), ("backlog", float(worst.backlog), "count")]
    detail = f"{worst.queued} of {worst.backlog} queued on {worst.address}"
    if rates is None:
        detail += "; drop rate from the next sample on"
    else:
        values += [("overflows_rate", round(rates[0], 3), "per_second"),
                   ("drops_rate", round(rates[1], 3), "per_second")]
        detail += f"; {rates[1]:.2f} listen drops/s on the node"
    obs = Observation(value=percent, unit="percent", detail=detail, values=tuple(values))
    if percent > cfg.max_fill_percent:
        raise CheckFailed(f"{label}: accept queue {worst.queued} of backlog {worst.backlog} ({percent:.0f}%) "
                          f"> {cfg.max_fill_percent:g}%: the server is not accepting fast enough",
                          "queue_full", observation=obs)
    if cfg.max_drops_per_second is not None and rates is not None and rates[1] > cfg.max_drops_per_second:
        raise CheckFailed(f"{label}: the node drops {rates[1]:.2f} connections/s at listen "
                          f"> {cfg.max_drops_per_second:g}/s (ListenDrops)", "drops", observation=obs)
    return obs

"""listen_queue against a real listener that never accepts while loopback clients fill its backlog."""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterator

import pytest

from agent.probes.base import Context
from tests.helpers import async_wait_for
from tests.probing import check, sample

BACKLOG = 4


@pytest.fixture
def clients() -> Iterator[list[socket.socket]]:
    """Client sockets, closed at teardown."""
    held: list[socket.socket] = []
    yield held
    for s in held:
        s.close()


def connect(port: int, held: list[socket.socket], n: int, host: str = "127.0.0.1") -> None:
    """Start n non-blocking connects; the kernel completes them into the accept queue while there is room."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(n):
        s = socket.socket(family, socket.SOCK_STREAM)
        s.setblocking(False)
        assert s.connect_ex((host, port)) in (0, errno.EINPROGRESS)
        held.append(s)


def listener(host: str = "127.0.0.1") -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.bind((host, 0))
    s.listen(BACKLOG)
    return s


async def failing(cfg, ctx: Context) -> object:
    """The next sample's result if it failed, else False (for async_wait_for)."""
    r = await sample(cfg, ctx)
    return not r.ok and r


async def test_full_accept_queue_fails_and_drops_are_counted(clients) -> None:
    """A listener that never accepts: its queue fills past the backlog, the check fails, and further SYNs count as drops."""
    server = listener()
    port = server.getsockname()[1]
    ctx = Context()
    cfg = check(type="listen_queue", port=port, max_fill_percent=90)
    try:
        r = await sample(cfg, ctx)
        assert r.ok, r.reason
        assert r.observation.detail.startswith(f"0 of {BACKLOG} queued on 127.0.0.1")

        connect(port, clients, BACKLOG + 1)  # the kernel queues up to backlog + 1 connections

        r = await async_wait_for(lambda: failing(cfg, ctx), timeout=5, what="the accept queue to fill")
        assert r.kind == "queue_full"
        assert r.reason.startswith(f"listen_queue :{port}: accept queue {BACKLOG + 1} of backlog {BACKLOG} (125%) > 90%")

        # The queue is full: the next SYNs are dropped (ListenOverflows and ListenDrops count them).
        lenient = check(type="listen_queue", name="drops", port=port, max_fill_percent=200, max_drops_per_second=0)
        first = await sample(lenient, ctx)
        assert first.ok and "drop rate from the next sample on" in first.observation.detail
        connect(port, clients, 3)

        r = await async_wait_for(lambda: failing(lenient, ctx), timeout=5, what="listen drops to be counted")
        assert r.kind == "drops"
        assert r.reason.startswith(f"listen_queue :{port}: the node drops ")
        rates = {name: value for name, value, _ in r.observation.values}
        assert rates["drops_rate"] > 0 and rates["overflows_rate"] > 0
    finally:
        server.close()
    r = await sample(cfg, ctx)
    assert (r.ok, r.kind, r.reason) == (False, "not_listening", f"listen_queue :{port}: nothing is listening")


async def test_ipv6_listener_and_host_filter(clients) -> None:
    """An IPv6 listener is found on ::1, and a host filter does not confuse it with an IPv4 one."""
    try:
        server = listener("::1")
    except OSError as e:
        pytest.skip(f"no IPv6 loopback here: {e}")
    port = server.getsockname()[1]
    try:
        connect(port, clients, 2, host="::1")

        async def two_queued() -> object:
            res = await sample(check(type="listen_queue", port=port, host="::1"))
            return res.ok and res.observation.values[0][1] == 2 and res

        r = await async_wait_for(two_queued, timeout=5, what="two queued connections")
        assert r.observation.value == 50.0 and r.observation.unit == "percent"
        other = await sample(check(type="listen_queue", port=port, host="127.0.0.1"))
        assert other.reason == f"listen_queue 127.0.0.1:{port}: nothing is listening"
    finally:
        server.close()

"""tcp: IPv4, IPv6 and unix-socket connects against real listeners, and banner checks that catch a hung server."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

from agent.probes import PROBES
from agent.probes.base import Context
from agent.runner import Runner
from tests.helpers import free_port
from tests.outage import drill, fast_check, outage


async def sample(**keys):
    cfg = PROBES["tcp"].Config(**{"name": "t", "type": "tcp", **keys})
    return await Runner(Context()).run(cfg)


async def _accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.close()


async def test_ipv4_listener_stopped_takes_node_down_and_back(start_agent) -> None:
    """A stopped IPv4 listener makes the node DOWN (`connection refused`) in time; a restarted one brings it UP."""
    port = free_port()
    servers = [await asyncio.start_server(_accept, "127.0.0.1", port, reuse_address=True)]
    check = fast_check("db-port", type="tcp", host="127.0.0.1", port=port)
    agent = await start_agent(drill(check))
    loop = asyncio.get_running_loop()

    def stop() -> None:
        asyncio.run_coroutine_threadsafe(_close(servers[-1]), loop).result(5)

    def restart() -> None:
        servers.append(asyncio.run_coroutine_threadsafe(
            asyncio.start_server(_accept, "127.0.0.1", port, reuse_address=True), loop).result(5))

    await outage(agent, check, stop, restart, f"tcp 127.0.0.1:{port}: connection refused")
    await _close(servers[-1])


async def _close(server: asyncio.Server) -> None:
    server.close()
    await server.wait_closed()


async def test_ipv6_literal_connects() -> None:
    """An IPv6 literal host connects, and a closed IPv6 port names the bracketed address."""
    server = await asyncio.start_server(_accept, "::1", 0)
    port = server.sockets[0].getsockname()[1]
    ok = await sample(host="::1", port=port)
    assert ok.ok and ok.observation.unit == "seconds", ok
    await _close(server)
    bad = await sample(host="::1", port=port)
    assert (bad.ok, bad.kind, bad.reason) == (False, "refused", f"tcp [::1]:{port}: connection refused")


async def test_unix_socket_path(tmp_path: Path) -> None:
    """A unix socket passes while served, fails `connection refused` with no listener, `no such socket` when gone."""
    path = tmp_path / "app.sock"
    server = await asyncio.start_unix_server(_accept, str(path))
    assert (await sample(path=str(path))).ok
    server.close()  # the socket file stays behind: nobody listens on it
    await server.wait_closed()
    if path.exists():
        r = await sample(path=str(path))
        assert (r.ok, r.kind, r.reason) == (False, "refused", f"tcp {path}: connection refused")
        path.unlink()
    r = await sample(path=str(path))
    assert (r.ok, r.kind, r.reason) == (False, "refused", f"tcp {path}: no such socket")


async def test_banner_check_catches_a_hung_server(start_agent, redis_factory) -> None:
    """send/expect against redis-server passes; a frozen server (SIGSTOP: the port still accepts) is DOWN."""
    redis = redis_factory()
    check = fast_check("redis-banner", type="tcp", port=redis.port, send="PING\r\n", expect="+PONG")
    agent = await start_agent(drill(check))
    await outage(agent, check, lambda: redis.proc.send_signal(signal.SIGSTOP),
                 lambda: redis.proc.send_signal(signal.SIGCONT), "timeout after 150 ms")


async def test_banner_mismatch_names_what_came_back(blackhole_server) -> None:
    """An answer without the expected text fails with what the server did say; a bare connect still passes."""
    server = await asyncio.start_server(_greet, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    r = await sample(port=port, expect="SSH-2.0")
    assert (r.ok, r.kind) == (False, "answer") and "got '220 smtp ready" in r.reason, r
    assert (await sample(port=blackhole_server.port)).ok  # the port accepts: a plain connect can't see the hang
    await _close(server)


async def _greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"220 smtp ready\r\n")
    await writer.drain()
    writer.close()

"""aiohttp on first need: a node only probed and scraped never loads it; the first request that needs it waits
for it and is answered as before; a load that fails or hangs closes what waited and fails nothing else."""

from __future__ import annotations

import asyncio
import concurrent.futures
import re
import socket
import time
from pathlib import Path

import pytest

from agent.config import parse_config
from agent.serving.listener import Listener
from agent.serving.metrics import make_registry, render
from agent.state import AgentState
from tests.helpers import AgentProcess, agent_toml, memory_check, wait_for
from tests.test_fasthealth import MEM, closed, read_response

# Compiled parts of aiohttp and of the libraries only it brings: mapped into the process once imported.
WEB_LIBRARIES = re.compile(r"/site-packages/(aiohttp|multidict|yarl|propcache|frozenlist)/")


def web_mapped(pid: int) -> bool:
    return bool(WEB_LIBRARIES.search(Path(f"/proc/{pid}/maps").read_text()))


def raw_get(port: int, path: str, timeout: float = 5.0) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        head = s.recv(64)
    return int(head.split()[1])


def test_an_agent_only_probed_and_scraped_never_loads_aiohttp(agent_process) -> None:
    """Probes (/health, /ready, /live, HEAD and GET, keep-alive and not) and Prometheus scrapes of /metrics
    are answered without aiohttp in the process; the first /status loads it and is answered."""
    agent: AgentProcess = agent_process(agent_toml() + memory_check())
    wait_for(lambda: agent.get("/health")[0] == 200, what="up")
    for path in ("/health", "/ready", "/live", "/metrics", "/health", "/metrics"):
        assert agent.get(path)[0] == 200, path
    with socket.create_connection(("127.0.0.1", agent.port), timeout=5) as s:  # keep-alive, HEAD included
        s.sendall(b"HEAD /health HTTP/1.1\r\nHost: x\r\n\r\nGET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
                  b"GET /live HTTP/1.0\r\n\r\n")
        got = b""
        while (chunk := s.recv(65536)):
            got += chunk
    assert got.count(b"HTTP/1.1 200 OK") == 3 and b"healthgate_up 1.0" in got
    assert not web_mapped(agent.proc.pid), "aiohttp was loaded for probes and scrapes"
    code, body = agent.get("/status")
    assert code == 200 and '"status": "pass"' in body
    assert web_mapped(agent.proc.pid), "the test cannot see aiohttp's libraries: it proves nothing"


def test_requests_that_need_aiohttp_at_once_are_all_answered_while_probes_go_on(agent_process) -> None:
    """Twenty /status, /health/<check> and unknown-path requests arriving together before aiohttp is
    loaded are each answered as aiohttp answers them, and probes sent meanwhile are answered promptly."""
    agent: AgentProcess = agent_process(agent_toml() + memory_check())
    wait_for(lambda: agent.get("/health")[0] == 200, what="up")
    assert not web_mapped(agent.proc.pid)
    paths = ["/status", "/health/mem", "/nope", "/health?verbose"] * 5
    want = {"/status": 200, "/health/mem": 200, "/nope": 404, "/health?verbose": 200}
    probe_times: list[float] = []
    with concurrent.futures.ThreadPoolExecutor(len(paths) + 1) as pool:
        slow = [pool.submit(raw_get, agent.port, p) for p in paths]
        while not all(f.done() for f in slow):
            t0 = time.monotonic()
            assert raw_get(agent.port, "/health") == 200
            probe_times.append(time.monotonic() - t0)
        assert [f.result() for f in slow] == [want[p] for p in paths]
    assert max(probe_times) < 1.0, probe_times


def _listener(cfg: dict | None = None, build=None, metrics: bool = False) -> tuple[Listener, AgentState]:
    now = asyncio.get_running_loop().time()
    state = AgentState(parse_config({"agent": {"allow_root": True}, "checks": [MEM], **(cfg or {})}), now)
    state.tick(now, 0.0)
    from agent.serving.http_api import make_app

    registry = make_registry(state)
    listener = Listener(state.config.server, state, build or (lambda: make_app(state, registry)),
                        metrics=(lambda: render(registry)) if metrics else None)
    return listener, state


async def _get(port: int, path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    return reader, writer


async def test_a_failed_load_closes_what_waited_and_the_next_request_loads_again() -> None:
    """When building aiohttp's app fails, the connection that waited for it is closed (never left hanging),
    probes are still answered, and the next request that needs aiohttp tries again and is answered."""
    from agent.serving.http_api import make_app

    calls = []
    listener, state = _listener()

    def build():
        calls.append(1)
        if len(calls) == 1:
            raise OSError("the disk went away")
        return make_app(state, make_registry(state))

    listener._build = build
    _, port = await listener.start("127.0.0.1", 0)
    try:
        reader, writer = await _get(port, "/status")
        assert await closed(reader)
        writer.close()
        assert not listener.loaded
        reader, writer = await _get(port, "/live")
        assert (await read_response(reader))[0] == 200
        writer.close()
        reader, writer = await _get(port, "/status")
        code, _, body = await read_response(reader)
        writer.close()
        assert code == 503 and b'"status"' in body and listener.loaded and len(calls) == 2
    finally:
        await listener.stop()


async def test_a_load_that_never_ends_drops_the_waiting_client_at_its_deadline() -> None:
    """If aiohttp's load hangs (an import stuck on a dead disk), a client waiting for it is dropped at
    read_timeout, counted as a deadline drop, while probes on other connections are answered."""
    listener, _ = _listener({"server": {"read_timeout": "500ms"}})
    stuck = asyncio.Event()

    async def never() -> None:
        await stuck.wait()

    listener.load = never  # type: ignore[method-assign]
    _, port = await listener.start("127.0.0.1", 0)
    try:
        reader, writer = await _get(port, "/status")
        r2, w2 = await _get(port, "/live")
        assert (await read_response(r2))[0] == 200
        w2.close()
        assert await closed(reader, timeout=5)
        writer.close()
        assert listener.guard.dropped["deadline"] == 1
    finally:
        stuck.set()
        await listener.stop()


async def test_pipelined_scrapes_are_answered_in_order_one_per_turn_of_the_loop() -> None:
    """Fifty scrapes pipelined in one write, then a probe, are all answered in order by the fast responder,
    and the loop runs other work between two renders (a scrape flood cannot stall the heartbeat)."""
    listener, _ = _listener(metrics=True)
    loop = asyncio.get_running_loop()
    ticks = [0]
    seen: list[int] = []

    def tick() -> None:
        ticks[0] += 1
        handle[0] = loop.call_soon(tick)

    handle = [loop.call_soon(tick)]
    inner = listener._metrics
    assert inner is not None

    def counting() -> bytes:
        seen.append(ticks[0])
        return inner()

    listener._metrics = counting
    _, port = await listener.start("127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n" * 50 + b"GET /live HTTP/1.1\r\nHost: x\r\n\r\n")
        for _ in range(50):
            code, headers, body = await read_response(reader)
            assert code == 200 and headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
            assert b"healthgate_up " in body
        code, _, body = await read_response(reader)
        assert (code, body) == (200, b"live\n")
        writer.close()
        assert len(seen) == 50 and all(b > a for a, b in zip(seen, seen[1:], strict=False)), seen
        assert not listener.loaded
    finally:
        handle[0].cancel()
        await listener.stop()


async def test_scrapes_past_max_request_rate_get_429_from_the_fast_responder() -> None:
    """Scrapes count against max_request_rate as they do through aiohttp: past it, 429 and the connection
    is closed, and the probes of another client are still answered."""
    listener, _ = _listener({"server": {"max_request_rate": 5}}, metrics=True)
    _, port = await listener.start("127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n" * 20)
        codes = []
        while True:
            try:
                codes.append((await read_response(reader))[0])
            except (asyncio.IncompleteReadError, ConnectionResetError):
                break
        writer.close()
        assert codes[-1] == 429 and set(codes[:-1]) == {200} and 4 <= len(codes) - 1 <= 6, codes
        assert listener.guard.dropped["rate"] == 1
        r2, w2 = await _get(port, "/live")
        assert (await read_response(r2))[0] == 200
        w2.close()
    finally:
        await listener.stop()


@pytest.mark.parametrize("fast_health", [True, False])
async def test_the_admin_socket_serves_the_app_on_first_need(tmp_path: Path, fast_health: bool) -> None:
    """The admin socket answers /status through aiohttp, loaded for it, whether or not the TCP listener's
    fast responder is on; with fast_health = false aiohttp is loaded at start."""
    listener, _ = _listener({"server": {"fast_health": fast_health}})
    await listener.start("127.0.0.1", 0)
    assert listener.loaded is (not fast_health)
    path = str(tmp_path / "admin.sock")
    await listener.start_unix(path)
    try:
        reader, writer = await asyncio.open_unix_connection(path)
        writer.write(b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n")
        code, _, body = await read_response(reader)
        writer.close()
        assert code == 503 and b'"checks"' in body and listener.loaded
    finally:
        await listener.stop()


async def test_clients_queued_behind_the_load_are_handed_over_a_batch_per_turn_of_the_loop() -> None:
    """Sixty-four clients that arrived while aiohttp loaded are all answered once it is there, handed over
    a batch at a time with the loop running between batches (a flood's first requests cannot stall it)."""
    from agent.serving.fasthealth import HAND_OVER_BATCH

    listener, _ = _listener()
    release = asyncio.Event()
    real_load = listener.load

    async def slow_load() -> None:
        await release.wait()
        await real_load()

    listener.load = slow_load  # type: ignore[method-assign]
    _, port = await listener.start("127.0.0.1", 0)
    loop = asyncio.get_running_loop()
    ticks, seen = [0], []

    def tick() -> None:
        ticks[0] += 1
        handle[0] = loop.call_soon(tick)

    handle = [loop.call_soon(tick)]
    try:
        n = 4 * HAND_OVER_BATCH
        clients = [await _get(port, "/status") for _ in range(n)]
        front = listener._fast
        assert front is not None
        deadline = loop.time() + 10
        while len(front.waiting) < n and loop.time() < deadline:
            await asyncio.sleep(0.01)
        assert len(front.waiting) == n
        real_handlers = listener._handlers

        def handlers(guard):
            inner = real_handlers(guard)

            def counting() -> asyncio.Protocol:
                seen.append(ticks[0])
                return inner()

            return counting

        listener._handlers = handlers  # type: ignore[method-assign]
        release.set()
        codes = [(await read_response(r))[0] for r, _ in clients]
        for _, w in clients:
            w.close()
        assert codes == [503] * n
        assert len(seen) == n and len(set(seen)) >= n // HAND_OVER_BATCH, seen
    finally:
        handle[0].cancel()
        await listener.stop()

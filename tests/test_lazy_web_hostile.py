"""Hostile clients around aiohttp's load on first need: what waits for it, what comes pipelined around it,
and clients that stop reading, half-close or flood."""

from __future__ import annotations

import asyncio
import socket
import threading

import pytest

from agent.serving import listener as listener_module
from tests.test_fasthealth import read_response
from tests.test_lazy_web import _listener, raw_get

HOST = b"Host: x\r\n"
LIVE = b"GET /live HTTP/1.1\r\n" + HOST + b"\r\n"
SCRAPE = b"GET /metrics HTTP/1.1\r\n" + HOST + b"\r\n"
STATUS = b"GET /status HTTP/1.1\r\n" + HOST + b"\r\n"
LIVE_ANSWERS = (b"live\n", b"stalled\n")  # nothing beats the heartbeat of these tests' state: it may go stale


@pytest.fixture
def slow_import(monkeypatch):
    """aiohttp's import waits in its thread (a slow disk) until the test sets the returned event."""
    go = threading.Event()
    real = listener_module._import_all

    def slow(names: tuple[str, ...]) -> None:
        go.wait(30)
        real(names)

    monkeypatch.setattr(listener_module, "_import_all", slow)
    yield go
    go.set()


async def until(pred, what: str, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not pred():
        assert loop.time() < end, what
        await asyncio.sleep(0.005)


def front_conn(listener):
    return next(iter(listener._fast.conns), None)


async def slow_link(listener, port: int):
    """A client socket and the agent's protocol for it, both ends with little room in the kernel: the
    agent's answers queue in its transport once the client stops reading."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", port))
    await until(lambda: front_conn(listener) is not None, "accepted")
    conn = front_conn(listener)
    conn.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    return s, conn


@pytest.mark.parametrize("loaded", [False, True])
async def test_a_client_that_stopped_reading_is_read_again_after_its_hand_over(slow_import, loaded: bool) -> None:
    """A keep-alive client that pipelined probes without reading, then /status, is handed to aiohttp while
    its answers wait to be sent (before or after aiohttp is loaded): once it reads them all, the next request
    on that connection is read and answered, not left unread until the read deadline drops it."""
    listener, _ = _listener({"server": {"read_timeout": "1h", "max_request_rate": 0}})
    _, port = await listener.start("127.0.0.1", 0)
    try:
        if loaded:  # by a request that needed it
            slow_import.set()
            assert await asyncio.to_thread(raw_get, port, "/status") == 503
        s, conn = await slow_link(listener, port)
        s.sendall(LIVE * 1500 + STATUS)  # in one read: far more answers than the buffers between hold
        if loaded:
            await until(lambda: conn.inner is not None, "handed over")
            assert conn.transport.get_write_buffer_size() > 0, "the buffer did not fill: it proves nothing"
        else:
            await until(lambda: conn.held, "held for the load")
            assert conn.paused, "the setup did not fill the transport's buffer: it proves nothing"
            slow_import.set()
        await until(lambda: listener.loaded and conn.inner is not None, "handed over")
        reader, writer = await asyncio.open_connection(sock=s)
        for _ in range(1500):
            assert (await read_response(reader))[0] == 200
        assert (await read_response(reader))[0] == 503  # /status: the one check has no result yet
        writer.write(STATUS)
        assert (await read_response(reader))[0] == 503
        writer.close()
    finally:
        await listener.stop()


async def test_a_scrape_flood_without_a_rate_limit_cannot_grow_the_buffer() -> None:
    """With max_request_rate = 0, a client that pipelines scrapes as fast as it can while reading the
    answers is read only as fast as they are rendered: what waits in the responder's buffer stays bounded
    (one read's worth), and another client's probe is answered promptly meanwhile."""
    listener, _ = _listener({"server": {"max_request_rate": 0}}, metrics=True)
    _, port = await listener.start("127.0.0.1", 0)
    loop = asyncio.get_running_loop()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)

        async def read_all() -> None:
            while await reader.read(1 << 20):
                pass

        async def flood() -> None:
            for _ in range(500):  # 35 MB of requests, far more than the agent renders in the test's time
                writer.write(SCRAPE * 2000)
                await writer.drain()

        tasks = [asyncio.create_task(read_all()), asyncio.create_task(flood())]
        peak = 0
        end = loop.time() + 1.5
        while loop.time() < end and not tasks[1].done():
            conn = front_conn(listener)
            peak = max(peak, len(conn.buf) if conn is not None else 0)
            await asyncio.sleep(0.01)
        r2, w2 = await asyncio.open_connection("127.0.0.1", port)
        w2.write(LIVE)
        await asyncio.wait_for(read_response(r2), 1.0)
        w2.close()
        for task in tasks:
            task.cancel()
        writer.close()
        assert not tasks[1].done() or tasks[1].cancelled(), "the flood was all read: it proves nothing"
        assert 0 < peak <= 1 << 20, peak
    finally:
        await listener.stop()


async def test_scrapes_pipelined_before_a_half_close_are_all_answered() -> None:
    """A client that pipelines four scrapes and a probe and then half-closes (shutdown SHUT_WR, as
    `nc -N` does) gets all five answers before the connection is closed."""
    listener, _ = _listener(metrics=True)
    _, port = await listener.start("127.0.0.1", 0)
    try:
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(SCRAPE * 4 + LIVE)
        s.shutdown(socket.SHUT_WR)
        reader, writer = await asyncio.open_connection(sock=s)
        data = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        assert data.count(b"HTTP/1.1 ") == 5 and data.endswith(LIVE_ANSWERS), data[-200:]
    finally:
        await listener.stop()


async def test_pipelined_scrapes_to_a_client_that_stopped_reading_are_all_answered_once_it_reads() -> None:
    """A client that pipelines 300 scrapes and a probe and reads nothing until the agent has stopped
    writing to it gets all 301 answers, in order, once it reads."""
    listener, _ = _listener({"server": {"max_request_rate": 0}}, metrics=True)
    _, port = await listener.start("127.0.0.1", 0)
    try:
        s, conn = await slow_link(listener, port)
        s.sendall(SCRAPE * 300 + LIVE)
        await until(lambda: conn.paused, "the agent stops writing to it")
        reader, writer = await asyncio.open_connection(sock=s)
        for _ in range(300):
            code, headers, body = await read_response(reader)
            assert code == 200 and b"healthgate_up " in body
        assert (await read_response(reader))[2] in LIVE_ANSWERS
        writer.close()
    finally:
        await listener.stop()


async def test_a_reload_while_the_app_starts_reaches_the_tokens_it_serves_with(tmp_path) -> None:
    """A reload that changes the admin token while aiohttp's app is built but still starting (an on_startup
    hook that awaits) is honoured by it: the request that waited for it, sent with the old token, is refused
    with 401, and the new token is accepted. (The agent's reload updates the app's tokens when
    `listener.app` is set.)"""
    from agent.serving.http_api import make_app
    from agent.serving.httpcommon import TOKENS
    from agent.serving.metrics import make_registry

    listener, state = _listener({"agent": {"allow_root": True, "state_dir": str(tmp_path)}})
    tokens = {"admin": "old"}
    starting, go = asyncio.Event(), asyncio.Event()

    async def on_startup(app) -> None:
        starting.set()
        await go.wait()

    def build():
        app = make_app(state, make_registry(state), dict(tokens))
        app.on_startup.append(on_startup)
        return app

    listener._build = build
    _, port = await listener.start("127.0.0.1", 0)

    async def ready(token: str) -> int:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /admin/ready HTTP/1.1\r\n" + HOST + b"Authorization: Bearer " + token.encode()
                     + b"\r\nContent-Length: 0\r\n\r\n")
        code = (await read_response(reader))[0]
        writer.close()
        return code

    try:
        waited = asyncio.create_task(ready("old"))
        await asyncio.wait_for(starting.wait(), 5)
        tokens = {"admin": "new"}  # the reload, as the agent does it
        if listener.app is not None:
            listener.app[TOKENS].update(tokens)
        go.set()
        assert await waited == 401
        assert await ready("new") == 200
    finally:
        go.set()
        await listener.stop()


async def test_a_scrape_as_prometheus_sends_it_is_answered_without_loading_aiohttp() -> None:
    """Prometheus's own scrape request (its Accept, Accept-Encoding, User-Agent and
    X-Prometheus-Scrape-Timeout-Seconds headers) is answered by the fast responder: aiohttp stays unloaded."""
    listener, _ = _listener(metrics=True)
    _, port = await listener.start("127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: 10.0.0.7:8080\r\nUser-Agent: Prometheus/2.54.0\r\n"
                     b"Accept: application/openmetrics-text;version=1.0.0;q=0.5,application/openmetrics-text;"
                     b"version=0.0.1;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2\r\n"
                     b"Accept-Encoding: gzip\r\nX-Prometheus-Scrape-Timeout-Seconds: 10\r\n\r\n")
        code, headers, body = await read_response(reader)
        writer.close()
        assert code == 200 and b"healthgate_up " in body and "server" not in headers
        assert not listener.loaded, "a Prometheus scrape loaded aiohttp"
    finally:
        await listener.stop()


async def test_a_load_that_keeps_failing_logs_a_line_a_minute_not_one_per_request(caplog) -> None:
    """When aiohttp's app cannot be built (a broken install), every request that needs it is closed and
    tries the load again, but a client sending them cannot flood the log: one line, then none for a minute
    (the next counts the failures in between); probes are answered throughout."""
    import logging

    caplog.set_level(logging.INFO, logger="healthgate")
    listener, _ = _listener()

    def build():
        raise OSError("the disk went away")

    listener._build = build
    _, port = await listener.start("127.0.0.1", 0)
    try:
        for _ in range(20):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(STATUS)
            assert await asyncio.wait_for(reader.read(), 5) == b""
            writer.close()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(LIVE)
        assert (await read_response(reader))[0] == 200
        writer.close()
        failed = [r for r in caplog.records if r.getMessage() == "http_app_load_failed"]
        assert len(failed) == 1 and failed[0].levelno == logging.ERROR, failed
        assert "the disk went away" in failed[0].fields["error"]
    finally:
        await listener.stop()

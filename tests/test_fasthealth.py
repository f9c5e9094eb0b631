"""The fast /health responder: same answers as aiohttp's handlers, strict HTTP/1.1, everything odd to aiohttp."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from aiohttp.test_utils import make_mocked_request

from agent.config import parse_config
from agent.model import Admin, Result
from agent.serving.fasthealth import FastHealth, parse_connection
from agent.serving.guard import Guard
from agent.serving.http_api import health, live, make_app
from agent.state import AgentState
from tests.helpers import async_wait_for

MEM = {"name": "mem", "type": "memory", "interval": "200ms", "timeout": "100ms", "rise": 1,
       "max_used_percent": 100}


def parse(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


async def read_response(reader: asyncio.StreamReader, head: bool = False) -> tuple[int, dict[str, str], bytes]:
    raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    code, headers, _ = parse(raw)
    n = 0 if head else int(headers.get("content-length", 0))
    body = await asyncio.wait_for(reader.readexactly(n), 5) if n else b""
    return code, headers, body


async def closed(reader: asyncio.StreamReader, timeout: float = 5) -> bool:
    """True when the server closed the connection (EOF or reset) within the timeout."""
    try:
        return await asyncio.wait_for(reader.read(), timeout) == b""
    except ConnectionResetError:
        return True


def _state(now: float, cfg: dict | None = None, passed_at: float | None = None,
           beat_at: float | None = None) -> AgentState:
    """A state with one critical memory check that passed at `passed_at` (None: no result yet)."""
    state = AgentState(parse_config({"agent": {"allow_root": True}, "checks": [MEM], **(cfg or {})}), now)
    if beat_at is not None:
        state.tick(beat_at, 0.0)
    if passed_at is not None:
        state.record("mem", Result(True, "", "ok", 0.001, passed_at, passed_at, 0.0), passed_at)
    return state


def states() -> dict[str, AgentState]:
    """One AgentState per served situation, built without a scheduler so each stays as set."""
    now = asyncio.get_running_loop().time()
    up = _state(now, passed_at=now, beat_at=now)
    down = _state(now, beat_at=now)
    stale = _state(now - 10, passed_at=now - 10, beat_at=now - 10)
    old_heartbeat = _state(now - 2, passed_at=now, beat_at=now - 2)  # a result landed after a stall
    stale_check = _state(now - 10, passed_at=now - 10, beat_at=now)
    drain503 = _state(now, passed_at=now, beat_at=now)
    drain503.set_admin(Admin.DRAIN, "test")
    drain404 = _state(now, {"server": {"drain_status": 404}}, passed_at=now, beat_at=now)
    drain404.set_admin(Admin.DRAIN, "test")
    maint = _state(now, passed_at=now, beat_at=now)
    maint.set_admin(Admin.MAINT, "test")
    stopping = _state(now, passed_at=now, beat_at=now)
    stopping.set_stopping(now)
    lagging = _state(now, passed_at=now)
    lagging.tick(now, 5.0)
    return {"up": up, "down": down, "stale": stale, "old_heartbeat": old_heartbeat, "stale_check": stale_check,
            "drain503": drain503, "drain404": drain404, "maint": maint, "stopping": stopping, "lagging": lagging}


SITUATIONS = ["up", "down", "stale", "old_heartbeat", "stale_check", "drain503", "drain404", "maint", "stopping",
              "lagging"]
EXPECTED_UP = {"up"}
EXPECTED_HEALTHY = {"up", "drain503", "drain404", "maint"}


@pytest.mark.parametrize("name", SITUATIONS)
async def test_answers_equal_aiohttp_handlers(name: str) -> None:
    """In every served situation the fast responder's status, body and headers equal aiohttp's handlers'."""
    state = states()[name]
    app = make_app(state, registry=None)
    front = FastHealth(state, fallback=lambda: None, guard=Guard(state.config.server))
    try:
        for kind, handler in (("health", health), ("live", live)):
            want = await handler(make_mocked_request("GET", "/" + kind, app=app))
            code, headers, body = parse(front.answer(kind, head=False, close=False, http10=False))
            assert (code, body.decode()) == (want.status, want.text), (name, kind)
            assert headers["content-type"] == want.content_type + "; charset=" + want.charset
            assert headers["cache-control"] == want.headers["Cache-Control"]
            assert int(headers["content-length"]) == len(body)
    finally:
        front.close()


async def test_metrics_answer_equals_aiohttp_handler() -> None:
    """The fast responder's /metrics has the status, content type and cache header of aiohttp's handler,
    the same metric families, and for HEAD the same length with no body."""
    from agent.serving.http_api import metrics
    from agent.serving.metrics import make_registry, render

    state = states()["up"]
    registry = make_registry(state)
    app = make_app(state, registry=registry)
    front = FastHealth(state, guard=Guard(state.config.server), fallback=lambda: None,
                       metrics=lambda: render(registry))

    def families(text: str) -> list[str]:
        return sorted(line.split()[2] for line in text.splitlines() if line.startswith("# TYPE"))

    try:
        want = await metrics(make_mocked_request("GET", "/metrics", app=app))
        code, headers, body = parse(front.answer("metrics", head=False, close=False, http10=False))
        assert code == want.status == 200
        assert headers["content-type"] == want.headers["Content-Type"]
        assert headers["cache-control"] == want.headers["Cache-Control"]
        assert int(headers["content-length"]) == len(body)
        assert families(body.decode()) == families(want.body.decode()) and "healthgate_up" in families(body.decode())
        code, headers, head_body = parse(front.answer("metrics", head=True, close=False, http10=False))
        assert code == 200 and head_body == b"" and int(headers["content-length"]) > 0
    finally:
        front.close()


@pytest.mark.parametrize("name", SITUATIONS)
async def test_every_consumer_says_the_same(name: str, tmp_path) -> None:
    """In every situation, every consumer tells the same story: the fast path, aiohttp's /health,
    ?verbose and /live, /status (JSON and HTML), /metrics, the agent-check reply and systemd's
    WATCHDOG=1 and STATUS= all say UP only when the node is served UP, and live only when it is live."""
    import socket

    from agent.serving.haproxy_agent import AgentCheckServer
    from agent.serving.http_api import status
    from agent.serving.metrics import make_registry
    from agent.serving.sdnotify import Notifier, ServiceManager
    from agent.serving.weight import WeightTracker

    state = states()[name]
    registry = make_registry(state)
    app = make_app(state, registry=registry, tokens={"status": "t0ken"})
    front = FastHealth(state, fallback=lambda: None, guard=Guard(state.config.server))
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(0.5)
    manager = ServiceManager(Notifier(str(tmp_path / "notify"), watchdog=1.0))
    try:
        up, healthy = name in EXPECTED_UP, name in EXPECTED_HEALTHY
        fast_code = parse(front.answer("health", head=False, close=False, http10=False))[0]
        assert (fast_code == 200) is up
        for path in ("/health", "/ready", "/health?verbose", "/health?exclude=none"):
            resp = await health(make_mocked_request("GET", path, app=app))
            assert resp.status == fast_code, path
        live_code = parse(front.answer("live", head=False, close=False, http10=False))[0]
        assert (await live(make_mocked_request("GET", "/live", app=app))).status == live_code
        for accept in ("application/json", "text/html"):
            headers = {"Accept": accept, "Authorization": "Bearer t0ken"}
            resp = await status(make_mocked_request("GET", "/status", headers=headers, app=app))
            assert (resp.status == 200) is up, accept
            if accept == "application/json":
                assert resp.text.startswith('{\n  "status": "%s"' % ("pass" if up else "fail"))
        assert registry.get_sample_value("healthgate_up") == float(up)
        assert registry.get_sample_value("healthgate_verdict_up") == float(healthy)
        assert registry.get_sample_value("healthgate_live") == float(live_code == 200)
        checks_up = registry.get_sample_value("healthgate_check_up", {"check": "mem", "type": "memory",
                                                                       "critical": "true"})
        assert checks_up == float(healthy or name in ("stopping", "lagging"))  # the check itself still passes
        reply = AgentCheckServer(state, WeightTracker(state, Path("/proc"))).reply()
        assert reply.split()[0] == ("up" if healthy else "down"), reply
        manager.beat(asyncio.get_running_loop().time(), state.answer(asyncio.get_running_loop().time()), True)
        sent = sock.recv(4096).decode().split("\n")
        assert ("WATCHDOG=1" in sent) is (live_code == 200)
        status_line = next(f for f in sent if f.startswith("STATUS="))
        assert (status_line == "STATUS=up") is up
    finally:
        front.close()
        sock.close()
        manager.close()


def test_connection_tokens_are_parsed_case_insensitively_across_headers() -> None:
    """Connection tokens are collected from every Connection header, lower-cased and trimmed."""
    assert parse_connection(b"\r\nHost: x\r\nconnection: Keep-Alive , TE\r\nCONNECTION:close") == {
        b"keep-alive", b"te", b"close"}
    assert parse_connection(b"\r\nHost: x-connection: close") == set()


@pytest.fixture
async def up_agent(start_agent):
    agent = await start_agent({"checks": [MEM]})
    await async_wait_for(lambda: _is_up(agent), timeout=5, what="up")
    return agent


async def _is_up(agent) -> bool:
    return (await agent.get("/health"))[0] == 200


async def connect(agent) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = agent.agent.address
    return await asyncio.open_connection(host, port)


async def test_keep_alive_serves_many_requests_on_one_connection(up_agent) -> None:
    """One keep-alive connection is answered request after request, GET and HEAD, without closing."""
    reader, writer = await connect(up_agent)
    for path in ("/health", "/ready", "/live") * 3:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        code, headers, body = await read_response(reader)
        assert code == 200 and body in (b"up\n", b"live\n") and "connection" not in headers
    writer.write(b"HEAD /health HTTP/1.1\r\nHost: x\r\n\r\n")
    code, headers, body = await read_response(reader, head=True)
    assert (code, headers["content-length"]) == (200, "3")
    writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")  # HEAD had no body: the next answer is whole
    assert (await read_response(reader))[2] == b"up\n"
    writer.close()


async def test_pipelined_requests_are_answered_in_order_across_the_hand_over(up_agent) -> None:
    """Pipelined probes are answered in order, and a non-probe request hands the rest to aiohttp in order."""
    reader, writer = await connect(up_agent)
    writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\nGET /live HTTP/1.1\r\nHost: x\r\n\r\n"
                 b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\nGET /health HTTP/1.1\r\nHost: x\r\n\r\n"
                 b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n")
    got = [await read_response(reader) for _ in range(5)]
    assert [c for c, _, _ in got] == [200, 200, 404, 200, 200]
    assert [b[:3] for _, _, b in got] == [b"up\n", b"liv", b"404", b"up\n", b"{\n "]
    assert "server" not in got[0][1] and "aiohttp" in got[2][1]["server"]  # who answered
    writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")  # the connection stays with aiohttp, served
    assert (await read_response(reader))[:1] == (200,)
    writer.close()


async def test_a_request_split_into_single_bytes_is_answered(up_agent) -> None:
    """A request head that arrives one byte at a time is answered once complete."""
    reader, writer = await connect(up_agent)
    for b in b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n":
        writer.write(bytes([b]))
        await writer.drain()
    assert (await read_response(reader))[0] == 200
    writer.close()


@pytest.mark.parametrize("request_bytes, header, eof", [
    (b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\nGET /health HTTP/1.1\r\n\r\n", "close", True),
    (b"GET /health HTTP/1.1\r\nConnection: TE, Close\r\nHost: x\r\n\r\n", "close", True),
    (b"GET /health HTTP/1.0\r\n\r\n", "close", True),
    (b"GET /health HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", "keep-alive", False),
    (b"GET /health HTTP/1.0\r\nConnection: keep-alive, close\r\n\r\n", "keep-alive", False),  # as aiohttp
])
async def test_connection_close_and_http10(up_agent, request_bytes: bytes, header: str, eof: bool) -> None:
    """Connection: close and plain HTTP/1.0 get one answer then EOF; HTTP/1.0 keep-alive stays open."""
    reader, writer = await connect(up_agent)
    writer.write(request_bytes)
    code, headers, _ = await read_response(reader)
    assert (code, headers["connection"]) == (200, header)
    if eof:
        assert await closed(reader)
    else:
        writer.write(request_bytes)
        assert (await read_response(reader))[0] == 200
    writer.close()


ODD = [
    b"GET /health HTTP/1.1\r\n\r\n",
    b"GET /health HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    b"GET /health HTTP/1.1\r\nHost: x\r\nUser-Agent: a\r\nUser-Agent: a\r\n\r\n",  # aiohttp: 400
    b"GET /health HTTP/1.1\r\nHost: a b\r\n\r\n",
    b"GET /health HTTP/1.1\r\nHost: x\r\nSec-WebSocket-Key1: x\r\n\r\n",
    b"GET /health HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    b"GET /health HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n\r\n",
    b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"Accept: x\r\n" * 200 + b"\r\n",
    b"GET /health HTTP/1.1\r\nHost: x\r\nUser-Agent: caf\xc3\xa9\r\n\r\n",
    b"POST /health HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
    b"PUT /health HTTP/1.1\r\n\r\n",
    b"get /health HTTP/1.1\r\n\r\n",
    b"GET /health?verbose=1 HTTP/1.1\r\n\r\n",
    b"GET /ready?verbose&exclude=mem HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /health/mem HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /health/nope HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /health HTTP/1.1\r\nContent-Length: 4\r\n\r\nbody",
    b"GET /health HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"GET /health HTTP/1.1\r\nBad Header: x\r\n\r\n",
    b"GET /health HTTP/1.1\r\nNoColon\r\n\r\n",
    b"GET /health HTTP/1.1\r\n folded: x\r\n\r\n",
    b"GET /health HTTP/1.1\r\nX: a\x00b\r\n\r\n",
    b"GET /health HTTP/1.1\r\nHost: x\r\nAccept: " + b"a" * 10000 + b"\r\n\r\n",
    b"GET /health HTTP/1.1\r\nHost: x\r\nAccept: " + b"a" * 5000 + b"\r\n\r\n",
    b"GET  /health HTTP/1.1\r\n\r\n",
    b"GET /health HTTP/2.0\r\n\r\n",
    b"GET /health\r\n\r\n",
    b"GARBAGE\r\n\r\n",
    b"\x00",  # never a probe, and aiohttp says so at once: the front used to hold it for read_timeout
    b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\r\n\r\n",
    b"GET /health HTTP/1.1\nHost: x\n\n",
    b"GET http://x/health HTTP/1.1\r\n\r\n",
]


async def _exchange(address: tuple[str, int], data: bytes) -> int | str:
    reader, writer = await asyncio.open_connection(*address)
    writer.write(data)
    try:
        raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        return parse(raw)[0]
    except (asyncio.IncompleteReadError, ConnectionResetError):
        return "closed"
    finally:
        writer.close()


@pytest.mark.parametrize("data", ODD, ids=lambda d: repr(d[:30]))
async def test_odd_requests_get_the_same_answer_as_without_the_front(start_agent, data: bytes) -> None:
    """Any request the front does not fully understand is answered exactly as aiohttp alone answers it."""
    fast = await start_agent({"checks": [MEM]})
    plain = await start_agent({"checks": [MEM], "server": {"fast_health": False}})
    assert fast.agent._web._fast is not None and plain.agent._web._fast is None
    for agent in (fast, plain):  # the same verdict on both, so only the front can make a difference
        await async_wait_for(lambda agent=agent: _is_up(agent), timeout=5, what="up")
    assert await _exchange(fast.agent.address, data) == await _exchange(plain.agent.address, data)


async def test_idle_and_slow_clients_are_closed_after_read_timeout(start_agent) -> None:
    """A connection that sends nothing, or a head that never completes, is closed after read_timeout."""
    agent = await start_agent({"checks": [MEM], "server": {"read_timeout": "300ms"}})
    idle = await connect(agent)
    slow = await connect(agent)
    t0 = asyncio.get_running_loop().time()
    slow[1].write(b"GET /health HTTP/1.1\r\nAccept: ")  # may still become a probe: the front holds it
    for _ in range(5):
        slow[1].write(b"a")
        await asyncio.sleep(0.1)
    assert await closed(idle[0], timeout=3) and await closed(slow[0], timeout=3)
    assert asyncio.get_running_loop().time() - t0 < 2.5
    for _, w in (idle, slow):
        w.close()


async def test_at_max_connections_a_new_connection_evicts_the_longest_idle_one(start_agent) -> None:
    """At server.max_connections a new probe is still served: the connection idle the longest is dropped."""
    agent = await start_agent({"checks": [MEM], "server": {"max_connections": 2}})
    oldest = await connect(agent)
    await asyncio.sleep(0.05)  # a later deadline than `oldest`
    newer = await connect(agent)
    assert await _served(agent)  # a third connection, answered
    assert await closed(oldest[0], timeout=3)
    newer[1].write(b"GET /live HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await read_response(newer[0]))[0] == 200
    for _, w in (oldest, newer):
        w.close()


async def _served(agent) -> bool:
    reader, writer = await connect(agent)
    writer.write(b"GET /live HTTP/1.1\r\nHost: x\r\n\r\n")
    try:
        return (await read_response(reader))[0] == 200
    except (asyncio.IncompleteReadError, ConnectionResetError):
        return False
    finally:
        writer.close()


async def test_stop_closes_open_probe_connections(start_agent) -> None:
    """Stopping the agent closes keep-alive probe connections as well as aiohttp's own."""
    agent = await start_agent({"checks": [MEM]})
    probe = await connect(agent)
    probe[1].write(b"GET /live HTTP/1.1\r\nHost: x\r\n\r\n")
    await read_response(probe[0])
    other = await connect(agent)
    other[1].write(b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n")
    await read_response(other[0])
    await agent.agent.stop()
    assert await closed(probe[0], timeout=3) and await closed(other[0], timeout=3)
    for _, w in (probe, other):
        w.close()


PROBES = [
    b"GET /health HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n",  # wrk
    b"GET /health HTTP/1.1\r\nHost: [::1]:8080\r\nUser-Agent: curl/7.88.1\r\nAccept: */*\r\n\r\n",  # curl
    b"GET /ready HTTP/1.1\r\nHost: 10.0.0.1:8080\r\nUser-Agent: kube-probe/1.29\r\nAccept: */*\r\n"
    b"Connection: close\r\n\r\n",  # kubelet
    b"GET /health HTTP/1.0\r\n\r\n",  # HAProxy's default httpchk
    b"HEAD /health HTTP/1.1\r\nhost: lb\r\nconnection: close\r\n\r\n",  # HAProxy http-check send ver HTTP/1.1
    b"GET /live HTTP/1.1\r\nHost: x\r\nUser-Agent: Go-http-client/1.1\r\nAccept-Encoding: gzip\r\n\r\n",
]


@pytest.mark.parametrize("data", PROBES, ids=lambda d: repr(d[:40]))
async def test_common_probes_are_answered_by_the_fast_path(up_agent, data: bytes) -> None:
    """The requests real probers send (wrk, curl, kubelet, HAProxy, Go) are answered by the fast path."""
    reader, writer = await connect(up_agent)
    writer.write(data)
    code, headers, _ = await read_response(reader, head=data.startswith(b"HEAD"))
    assert code == 200 and "server" not in headers  # aiohttp would have added Server
    writer.close()

"""Hostile HTTP clients against a real agent process: slowloris, idle floods, oversized heads, odd methods."""

from __future__ import annotations

import asyncio
import re
import resource
import socket
import time
from collections.abc import Iterator

import aiohttp
import pytest

from tests.helpers import AgentProcess, agent_toml, async_wait_for, memory_check, scrape, wait_for

CAP = 64
READ_TIMEOUT = 1.0

CONFIG = agent_toml({"max_connections": CAP, "read_timeout": READ_TIMEOUT}) + memory_check()


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    proc = AgentProcess(tmp_path_factory.mktemp("hostile"), CONFIG).start()
    wait_for(lambda: proc.get("/health")[0] == 200, what="up: the tests that expect 200 start right away")
    yield proc
    proc.stop()


def raw(port: int, data: bytes, timeout: float = 3.0, until_close: bool = False) -> bytes:
    """Send `data` on a fresh connection; read one response head, or everything until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        while until_close or b"\r\n\r\n" not in out:
            chunk = s.recv(65536)
            if not chunk:
                break
            out += chunk
        return out


def status_of(response: bytes) -> int:
    m = re.match(rb"HTTP/1\.[01] (\d{3}) ", response)
    assert m, response[:200]
    return int(m.group(1))


def metric(agent: AgentProcess, series: str) -> float:
    return scrape(agent.url).get(series, 0.0)


async def probe_health(url: str, stop: asyncio.Event, codes: list[int], worst: list[float]) -> None:
    """What a load balancer does: a fresh connection per check, a short timeout."""
    timeout = aiohttp.ClientTimeout(total=1.0)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(force_close=True)) as s:
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                async with s.get(url + "/health") as resp:
                    codes.append(resp.status)
            except (aiohttp.ClientError, TimeoutError) as e:
                codes.append(-1)
                print("probe failed:", repr(e))
            worst[0] = max(worst[0], time.monotonic() - t0)
            await asyncio.sleep(0.05)


async def closed_by_server(reader: asyncio.StreamReader) -> None:
    try:
        while await reader.read(4096):
            pass
    except ConnectionError:
        pass


@pytest.mark.parametrize("request_bytes", [
    b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 5000 + b"\r\n\r\n",
    b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(40)) + b"\r\n",
    b"GET /health?" + b"q" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
], ids=["long-header", "too-many-headers", "long-request-line"])
def test_oversized_heads_get_431(agent: AgentProcess, request_bytes: bytes) -> None:
    """An oversized request head is answered 431 and the connection closed, without echoing it back."""
    response = raw(agent.port, request_bytes, until_close=True)  # times out unless the server closes
    assert status_of(response) == 431
    assert b"aaaa" not in response and b"qqqq" not in response


def test_ordinary_probe_heads_fit(agent: AgentProcess) -> None:
    """A realistic probe with a token and a dozen headers stays well inside the limits."""
    headers = b"".join(b"X-Probe-%d: %s\r\n" % (i, b"v" * 100) for i in range(12))
    response = raw(agent.port, b"GET /health HTTP/1.1\r\nHost: node\r\nAuthorization: Bearer " + b"t" * 200
                   + b"\r\n" + headers + b"\r\n")
    assert status_of(response) == 200


@pytest.mark.parametrize("method, code", [
    *((m, 405) for m in ("POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "PROPFIND")),
    ("FOO", 400),  # not an HTTP method at all: the parser refuses it before routing
])
def test_other_methods_get_405(agent: AgentProcess, method: str, code: int) -> None:
    """Only GET and HEAD are served; every other HTTP method is 405, a token that is no method 400."""
    response = raw(agent.port, f"{method} /health HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n".encode())
    assert status_of(response) == code


def test_head_and_bodies(agent: AgentProcess) -> None:
    """HEAD answers without a body; a request with a body (sized or chunked) is refused with 413."""
    head = raw(agent.port, b"HEAD /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status_of(head) == 200 and head.endswith(b"\r\n\r\n")
    sized = raw(agent.port, b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
    assert status_of(sized) == 413
    chunked = raw(agent.port, b"GET /health HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                              b"5\r\nhello\r\n0\r\n\r\n")
    assert status_of(chunked) == 413


def test_garbage_is_400_and_never_logged_per_request(agent: AgentProcess) -> None:
    """Non-HTTP bytes get 400; malformed requests are counted in metrics, never a traceback in the log."""
    before = metric(agent, 'healthgate_http_bad_requests_total{code="400"}')
    for _ in range(20):
        assert status_of(raw(agent.port, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n")) == 400
    assert metric(agent, 'healthgate_http_bad_requests_total{code="400"}') == before + 20
    log = agent.logs()
    assert "Traceback" not in log and "Error handling request" not in log


async def test_slowloris_is_cut_at_the_read_timeout(agent: AgentProcess) -> None:
    """Clients trickling a request head are disconnected read_timeout after connecting; /health stays 200."""
    stop, codes, worst = asyncio.Event(), [], [0.0]
    prober = asyncio.create_task(probe_health(agent.url, stop, codes, worst))

    async def loris() -> float:
        reader, writer = await asyncio.open_connection("127.0.0.1", agent.port)
        t0 = time.monotonic()
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n")

        async def trickle() -> None:
            for i in range(100):
                await asyncio.sleep(0.2)
                writer.write(b"X-%d: y\r\n" % i)

        dribble = asyncio.create_task(trickle())
        try:
            await asyncio.wait_for(closed_by_server(reader), timeout=READ_TIMEOUT + 4)
            return time.monotonic() - t0
        finally:
            dribble.cancel()
            writer.close()

    try:
        lifetimes = await asyncio.gather(*(loris() for _ in range(CAP // 2)))
    finally:
        stop.set()
        await prober
    assert max(lifetimes) < READ_TIMEOUT + 1.0, lifetimes
    assert min(lifetimes) > READ_TIMEOUT * 0.8, lifetimes
    assert codes and set(codes) == {200}, codes
    assert worst[0] < 0.5, worst


async def test_idle_connection_flood_is_capped_and_health_stays_answered(agent: AgentProcess) -> None:
    """2000 idle connections: at most max_connections stay open, the rest are shed, probes keep getting 200,
    and every idle connection is gone after read_timeout."""
    n = 2000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < n + 500:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, n + 1000), hard))
    stop, codes, worst = asyncio.Event(), [], [0.0]
    prober = asyncio.create_task(probe_health(agent.url, stop, codes, worst))
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        t0 = time.monotonic()
        for _ in range(n):
            conns.append(await asyncio.open_connection("127.0.0.1", agent.port))
        opened = time.monotonic() - t0
        watchers = [asyncio.create_task(closed_by_server(r)) for r, _ in conns]

        async def all_but_cap_shed() -> bool:
            return sum(w.done() for w in watchers) >= n - CAP - 10

        # All but the last `CAP` or so were evicted as newer ones came in; their watchers see the close.
        await async_wait_for(all_but_cap_shed, timeout=5, what=f"{n - CAP - 10} connections shed")
        shed = sum(w.done() for w in watchers)
        assert shed >= n - CAP - 10, (shed, opened)
        open_now = await asyncio.to_thread(metric, agent, "healthgate_http_connections")
        assert open_now <= CAP
        done, pending = await asyncio.wait(watchers, timeout=READ_TIMEOUT + 2.0)
        assert not pending, f"{len(pending)} idle connections outlived read_timeout"
    finally:
        stop.set()
        await prober
        for _, w in conns:
            w.close()
    assert codes and set(codes) == {200}, sorted(set(codes))
    assert worst[0] < 0.5, worst
    assert await asyncio.to_thread(metric, agent, 'healthgate_http_dropped_connections_total{reason="capacity"}') \
        >= n - CAP - 10


async def test_client_that_never_reads_is_dropped(agent_process) -> None:
    """A client that pipelines requests and never reads the answers is aborted at the deadline (with no
    max_request_rate: past it the client would be refused with a 429 first, which a test below covers)."""
    agent = agent_process(CONFIG.replace("[server]", "[server]\nmax_request_rate = 0"))
    reader, writer = await asyncio.open_connection("127.0.0.1", agent.port)
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    t0 = time.monotonic()
    try:
        request = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
        for _ in range(2000):
            writer.write(request * 10)
            if writer.transport.get_write_buffer_size() > 1 << 20:
                break
            await asyncio.sleep(0)
        # Never read: the agent's writes back up, then the deadline aborts the connection.
        while time.monotonic() - t0 < READ_TIMEOUT + 5:
            await asyncio.sleep(0.1)
            dropped = await asyncio.to_thread(
                metric, agent, 'healthgate_http_dropped_connections_total{reason="deadline"}')
            if dropped and await asyncio.to_thread(metric, agent, "healthgate_http_connections") <= 1:
                break
        else:
            pytest.fail("the non-reading client was never dropped")
    finally:
        writer.close()
    assert agent.get("/health")[0] == 200


# -- max_request_rate: junk cannot crowd out the probes --------------------------------------------------------

class FakeTransport:
    def __init__(self, host: str):
        self.host = host

    def get_extra_info(self, name: str):
        return (self.host, 40000) if name == "peername" else None


def test_the_request_rate_is_a_token_bucket_per_address() -> None:
    """A second's worth of burst, refilled at the rate; probes cost a tenth; each address has its own
    bucket, and only the BUCKETS most recent addresses are remembered."""
    from agent.config import ServerConfig
    from agent.serving.guard import BUCKETS, Guard

    guard = Guard(ServerConfig(max_request_rate=10))
    a, b = FakeTransport("192.0.2.1"), FakeTransport("192.0.2.2")
    assert all(guard.within_rate(a, 0.0, probe=False) for _ in range(10))
    assert not guard.within_rate(a, 0.0, probe=False)
    assert guard.within_rate(b, 0.0, probe=False)  # another address: its own bucket
    assert guard.within_rate(a, 0.1, probe=False) and not guard.within_rate(a, 0.1, probe=False)  # +1 token
    assert not guard.within_rate(a, 0.115, probe=False)  # 0.15 of a token: no request...
    assert guard.within_rate(a, 0.115, probe=True)  # ...but a probe, which costs a tenth
    assert guard.within_rate(a, 0.3, probe=False, take=False) and guard.within_rate(a, 0.3, probe=False)
    assert guard.dropped["rate"] >= 2
    for i in range(BUCKETS + 10):
        guard.within_rate(FakeTransport(f"10.0.{i // 256}.{i % 256}"), 1.0, probe=False)
    assert len(guard._buckets) == BUCKETS
    unlimited = Guard(ServerConfig(max_request_rate=0))
    assert all(unlimited.within_rate(a, 0.0, probe=False) for _ in range(1000))


def _get(port: int, path: str, keep: socket.socket | None = None) -> tuple[bytes, socket.socket]:
    """One GET on `keep` (or a new connection): the whole response, head and body (b"" when closed)."""
    s = keep or socket.create_connection(("127.0.0.1", port), timeout=3)
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    out = b""
    while b"\r\n\r\n" not in out:
        chunk = s.recv(65536)
        if not chunk:
            return out, s
        out += chunk
    head, _, body = out.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
    while len(body) < length:
        body += s.recv(65536)
    return head + b"\r\n\r\n" + body, s


def test_past_max_request_rate_junk_gets_429_and_probes_still_200(agent_process, tmp_path) -> None:
    """Past max_request_rate, a client's junk is refused with 429 and its connection closed, on a new
    connection (by the fast responder, before aiohttp parses it) and on a keep-alive one aiohttp holds; the
    probes of the same client are still answered 200, and the refusals are counted."""
    proc = agent_process(CONFIG.replace("[server]", "[server]\nmax_request_rate = 5"))
    wait_for(lambda: proc.get("/health")[0] == 200, what="up")
    port = proc.port
    first, kept = _get(port, "/junk")
    assert status_of(first) == 404
    codes = []
    while not codes or codes[-1] == 404:  # the same keep-alive connection, held by aiohttp
        codes.append(status_of(_get(port, "/junk", kept)[0]))
        assert len(codes) < 20, codes
    assert codes[:3] == [404] * 3 and codes[-1] == 429, codes
    assert kept.recv(1) == b""  # closed after the 429
    fresh = [status_of(_get(port, "/junk")[0]) for _ in range(3)]
    assert fresh == [429] * 3, fresh
    assert status_of(_get(port, "/health")[0]) == 200  # the fast responder's probes never ask
    wait_for(lambda: status_of(_get(port, "/junk")[0]) == 404, timeout=3, what="the bucket refilled")
    # /metrics is not a probe: it waits its turn in the same bucket, as any other client's junk would.
    wait_for(lambda: scrape(proc.url)['healthgate_http_dropped_connections_total{reason="rate"}'] >= 4,
             timeout=3, what="the refusals counted")


def test_with_fast_health_off_probes_are_never_rate_limited() -> None:
    """fast_health = false sends every probe to aiohttp: the probes then never count against the limit (a load
    balancer must not be refused for probing), while junk still does."""
    from agent.config import ServerConfig
    from agent.serving.guard import Guard

    guard = Guard(ServerConfig(max_request_rate=1, fast_health=False))
    a = FakeTransport("192.0.2.9")
    assert all(guard.within_rate(a, 0.0, probe=True) for _ in range(1000))
    assert guard.within_rate(a, 0.0, probe=False) and not guard.within_rate(a, 0.0, probe=False)

"""Differential fuzzing: any bytes get the same answers from the fast responder as from aiohttp alone."""

from __future__ import annotations

import array
import asyncio
import fcntl
import itertools
import logging
import os
import re
import socket
import termios
import threading
import time
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, assume, example, given, settings
from hypothesis import strategies as st

from agent.config import parse_config
from agent.model import Admin, Result
from agent.serving.fasthealth import ALLOWED
from agent.serving.guard import Guard
from agent.serving.http_api import make_app
from agent.serving.listener import Listener
from agent.serving.metrics import make_registry
from agent.state import AgentState

# The suite runs a fixed, repeatable budget; `make fuzz` sets HEALTHGATE_FUZZ_EXAMPLES and draws fresh inputs.
BUDGET = int(os.environ.get("HEALTHGATE_FUZZ_EXAMPLES", "0"))
FUZZ = settings(max_examples=BUDGET or 80, derandomize=not BUDGET, database=None, deadline=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
                phases=[Phase.explicit, Phase.generate, Phase.shrink])  # explaining reruns a failure for minutes

# Both listeners read one AgentState that nothing but the test writes: no scheduler, so a verdict stays as
# set. The check never goes stale by itself and the snapshot stays fresh for the length of an exchange.
CONFIG = {
    "agent": {"allow_root": True},
    "policy": {"max_loop_lag": "30s", "loop_recovery": "0s", "flap_threshold": 0},
    "checks": [{"name": "mem", "type": "memory", "interval": "1h", "timeout": "1s", "rise": 1, "fall": 1,
                "max_used_percent": 100}],
}
SITUATIONS = ("up", "down", "drain503", "drain404", "maint", "stalled")

QUIET = 0.03  # no new bytes this long and the server has read everything: the exchange is over
PATIENT = 1.0  # the same, when the two answers differ: a loaded machine may simply have been slow
DEADLINE = 10.0  # no exchange may take longer: a hang fails the test


# -- the two servers ---------------------------------------------------------------------------------


def responses(raw: bytes) -> tuple[tuple, ...]:
    """A response stream as (status, reason, persistent, headers, body) tuples: what a client acts on.

    Left out: Date and Server, the order of headers, and the status line's version with the Connection
    header, which both become `persistent` (whether the client may send another request). The fast path
    answers HTTP/1.0 with "HTTP/1.1 ... Connection: close", aiohttp with "HTTP/1.0" and no Connection
    header; RFC 9112 section 2.3 asks for the former, and both mean the same to a client.
    The request a response answers is not known here, so a body is taken only when the bytes after the head
    are not the next status line: no body this agent sends starts with "HTTP/1.".
    """
    out: list[tuple] = []
    while raw:
        head, sep, rest = raw.partition(b"\r\n\r\n")
        if not sep:
            out.append(("partial", head))
            break
        status, *lines = head.split(b"\r\n")
        version, code, reason = (status.split(b" ", 2) + [b"", b""])[:3]
        fields = sorted((k.strip().lower(), v.strip()) for k, _, v in (line.partition(b":") for line in lines))
        tokens = {t.strip().lower() for k, v in fields if k == b"connection" for t in v.split(b",")}
        persistent = b"close" not in tokens and (version == b"HTTP/1.1" or b"keep-alive" in tokens)
        headers = tuple((k, v) for k, v in fields if k not in (b"date", b"server", b"connection"))
        n = int(dict(headers).get(b"content-length", b"0"))
        if rest.startswith(b"HTTP/1."):  # a HEAD answer, or a body-less one
            n = 0
        out.append((code, reason, persistent, headers, rest[:n]))
        raw = rest[n:]
    return tuple(out)


def fast_answered(raw: bytes) -> list[bool]:
    """For each response, whether the fast path wrote it: aiohttp always sends a Server header."""
    return [b"\r\nserver:" not in head.lower() for head in raw.split(b"HTTP/1.")[1:]]


@dataclass
class Outcome:
    raw: bytes
    closed: bool
    first: bytes = b""  # what had come when the first step had settled

    @property
    def seen(self) -> tuple:
        """What a load balancer sees: the answers and whether the connection is still open after them."""
        return responses(self.raw), self.closed


@dataclass
class Conn:
    """The client side of one exchange: a plain non-blocking socket, so a refused write loses no answer."""

    sock: socket.socket
    guard: Guard
    me: tuple = ()  # the client's own address: the server's peername for this connection
    got: bytearray = field(default_factory=bytearray)
    last: float = 0.0
    reader: asyncio.Task | None = None

    @property
    def outcome(self) -> Outcome:
        return Outcome(bytes(self.got), self.reader is not None and self.reader.done())


class Pair:
    """A fast-front listener and an aiohttp-only one on loopback, over one AgentState, on a loop thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fuzz-servers", daemon=True)
        self.thread.start()
        self.errors: list[str] = []
        self.catcher = LogCatcher()
        self.loop.set_exception_handler(lambda loop, ctx: self.errors.append(repr(ctx)))
        self.run(self._start())

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(DEADLINE * 3)

    async def _start(self) -> None:
        now = self.loop.time()
        self.state = AgentState(parse_config(CONFIG), now)
        self.listeners: dict[str, Listener] = {}
        self.addresses: dict[str, tuple[str, int]] = {}
        for name, fast in (("fast", True), ("aiohttp", False)):
            listener = Listener(parse_config({**CONFIG, "server": {"fast_health": fast}}).server, self.state,
                                lambda: make_app(self.state, make_registry(self.state)))
            self.listeners[name] = listener
            self.addresses[name] = await listener.start("127.0.0.1", 0)
        assert self.listeners["fast"]._fast is not None and self.listeners["aiohttp"]._fast is None

    async def stop(self) -> None:
        for listener in self.listeners.values():
            await listener.stop()

    def close(self) -> None:
        self.run(self.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()

    def situation(self, name: str) -> None:
        """Drive the shared state to one served situation; every call sets every part of it afresh."""
        state, now = self.state, self.loop.time()
        drain_status = 404 if name == "drain404" else 503
        state.apply_config(parse_config({**CONFIG, "server": {"drain_status": drain_status}}), now)
        ok = name != "down"
        state.record("mem", Result(ok, "" if ok else "fuzz: down", "ok" if ok else "error", 0.0, now, now,
                                   time.time()), now)
        admin = {"drain503": Admin.DRAIN, "drain404": Admin.DRAIN, "maint": Admin.MAINT}.get(name, Admin.READY)
        state.set_admin(admin, "fuzz" if admin is not Admin.READY else "")
        state.tick(now, 0.0)
        if name == "stalled":  # a snapshot older than max_loop_lag: the loop has not refreshed it
            state.refresh(now - 60)

    # -- one exchange ------------------------------------------------------------------------------

    async def connect(self, name: str) -> Conn:
        sock = socket.socket()
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await self.loop.sock_connect(sock, self.addresses[name])
        conn = Conn(sock, self.listeners[name].guard, sock.getsockname(), last=self.loop.time())
        conn.reader = asyncio.create_task(self._read(conn))
        return conn

    async def _read(self, conn: Conn) -> None:
        try:
            while data := await self.loop.sock_recv(conn.sock, 65536):
                conn.got += data
                conn.last = self.loop.time()
        except (ConnectionResetError, BrokenPipeError):
            pass  # closed with unread bytes, as both servers do after a last answer: still closed

    def server_side(self, conn: Conn) -> Any:
        """The server's protocol for this client, or None once the server has let go of it."""
        for proto in list(conn.guard.open):
            transport = proto.transport
            if transport is not None and not transport.is_closing() and transport.get_extra_info("peername") == conn.me:
                return proto
        return None

    def unread(self, conn: Conn) -> int:
        """Bytes the server has not read yet, from the server socket's receive queue (0 when it is gone)."""
        proto = self.server_side(conn)
        if proto is None:
            return 0
        buf = array.array("i", [0])
        fcntl.ioctl(proto.transport.get_extra_info("socket").fileno(), termios.FIONREAD, buf)
        return buf[0]

    async def send(self, conn: Conn, chunks: list[bytes]) -> None:
        """Each chunk on its own: the next goes only once the server has read the one before."""
        for chunk in chunks:
            if conn.reader.done():
                return  # the server closed: the rest would only be refused
            try:
                await self.loop.sock_sendall(conn.sock, chunk)
            except (BrokenPipeError, ConnectionResetError):
                return
            conn.last = self.loop.time()  # a quiet period counts from the last byte either way
            deadline, spins = self.loop.time() + DEADLINE, 0
            while self.unread(conn):  # the server reads on the next turns of this same loop
                assert self.loop.time() < deadline, "the server stopped reading"
                spins += 1
                await asyncio.sleep(0 if spins < 20 else 0.001)

    async def settle(self, conn: Conn, quiet: float) -> None:
        """Until the server closes, or has read everything and sent nothing more for `quiet` seconds."""
        deadline = self.loop.time() + DEADLINE
        while not conn.reader.done():
            assert self.loop.time() < deadline, f"no end to the answers: {bytes(conn.got[-200:])!r}"
            wait = conn.last + quiet - self.loop.time()
            if wait <= 0 and not self.unread(conn):
                return
            await asyncio.wait({conn.reader}, timeout=max(wait, 0.001))

    async def side(self, name: str, steps: list[list[bytes]], quiet: float) -> Outcome:
        """The steps to one listener over one connection, each once the answers to the one before are in;
        a step is not sent once the server has closed. Afterwards the server must let go of the connection."""
        conn = await self.connect(name)
        first = None
        try:
            for chunks in steps:
                if conn.reader.done():
                    break
                await self.send(conn, chunks)
                await self.settle(conn, quiet)
                first = bytes(conn.got) if first is None else first
            return replace(conn.outcome, first=first or b"")
        finally:
            conn.sock.close()
            conn.reader.cancel()
            await asyncio.gather(conn.reader, return_exceptions=True)
            await self.released(conn)

    async def released(self, conn: Conn) -> None:
        """The server lets go of a connection the client closed: nothing is left open behind it."""
        deadline = self.loop.time() + DEADLINE
        while self.server_side(conn) is not None:
            assert self.loop.time() < deadline, "the server kept a closed connection"
            await asyncio.sleep(0.001)

    async def exchange(self, situation: str, chunks: list[bytes], follow: bool) -> list[tuple[str, Outcome]]:
        """The fast front's outcome, then aiohttp's: the first that agrees, else every one tried.

        aiohttp alone is not the same for every split of a stream: a read that holds a complete request and
        then bytes its parser rejects is answered with one 400, the complete request's answer dropped (and
        bytes after a Connection: close are such bytes). The fast path answers each probe as it completes, so
        it is held against aiohttp given the same reads and, failing that, the same reads cut after each
        request the fast path answered itself (each ends at the next CRLF CRLF: a probe has no body).
        """
        self.situation(situation)
        self.catcher.records.clear()  # the transitions just made are logged; from here on nothing may be
        self.errors.clear()
        extra = [[SENTINEL]] if follow else []
        tried: list[tuple[str, Outcome]] = []
        for quiet in (QUIET, PATIENT):  # a difference after PATIENT is not a loaded machine being slow
            fast, plain = await asyncio.gather(self.side("fast", [chunks, *extra], quiet),
                                               self.side("aiohttp", [chunks, *extra], quiet))
            tried = [("fast", fast), ("aiohttp", plain)]
            if fast.seen == plain.seen:
                return tried
            answered = sum(fast_answered(fast.first))
            if answered:
                steps = [*one_by_one(chunks, answered), *extra]
                tried.append(("aiohttp, one by one", await self.side("aiohttp", steps, quiet)))
                if tried[-1][1].seen == fast.seen:
                    return tried
        return tried


def one_by_one(chunks: list[bytes], heads: int) -> list[list[bytes]]:
    """The chunks as steps: each of the first `heads` requests (up to its CRLF CRLF) on its own, then the rest."""
    data, ends, pos = b"".join(chunks), [], 0
    for _ in range(heads):
        pos = data.find(b"\r\n\r\n", pos) + 4
        if pos < 4:
            break
        ends.append(pos)
    edges = list(itertools.accumulate(len(c) for c in chunks))
    steps, start = [], 0
    for end in [*ends, len(data)]:
        cuts = [start] + [e for e in edges if start < e < end] + [end]
        steps.append([data[a:b] for a, b in itertools.pairwise(cuts)])
        start = end
    return [s for s in steps if s]


SENTINEL = b"GET /live HTTP/1.1\r\nHost: x\r\n\r\n"


class LogCatcher(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


LOGGERS = ("healthgate", "aiohttp", "asyncio")


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    p = Pair()
    for name in LOGGERS:
        logging.getLogger(name).addHandler(p.catcher)
    try:
        yield p
    finally:
        p.close()
        for name in LOGGERS:
            logging.getLogger(name).removeHandler(p.catcher)


def check(pair: Pair, situation: str, chunks: list[bytes], follow: bool = False) -> Outcome:
    """One differential exchange; fails on any difference a load balancer could see, or any logged error."""
    tried = pair.run(pair.exchange(situation, chunks, follow))
    fast = tried[0][1]
    assert any(o.seen == fast.seen for _, o in tried[1:]), f"\n  sent {b''.join(chunks)!r} in {len(chunks)} " \
        f"chunks, {situation}, follow={follow}" + "".join(f"\n  {n}: {o.raw!r} closed={o.closed}" for n, o in tried)
    assert not pair.errors, pair.errors
    assert not pair.catcher.records, [r.getMessage() for r in pair.catcher.records]
    return fast


# -- inputs ---------------------------------------------------------------------------------------

CRLF = b"\r\n"
HTTP09 = re.compile(rb"(?:^|\n)[A-Z]+ [/*][!-~]*\r?\n")  # a request line of a method and a target, no version
PATHS = st.sampled_from([b"/health", b"/ready", b"/live"])
HOSTS = st.sampled_from([b"x", b"lb", b"127.0.0.1:8080", b"[::1]:8080", b"10.0.0.1", b"node-1.example:80", b""])
VALUES = {
    "user-agent": [b"kube-probe/1.29", b"curl/8.5.0", b"Go-http-client/1.1", b"HAProxy", b"Consul Health Check"],
    "accept": [b"*/*", b"text/plain", b"application/json, */*;q=0.5"],
    "connection": [b"close", b"keep-alive", b"Keep-Alive", b"CLOSE", b"TE, close", b"te", b"keep-alive, close",
                   b"Upgrade", b"", b" close ", b"clos", b"close\t"],
    "keep-alive": [b"timeout=5", b"timeout=5, max=100"],
}
PRINTABLE = st.binary(max_size=24).map(lambda b: bytes(0x20 + c % 95 for c in b))  # \x20-\x7e
NAME_CASE = st.sampled_from([bytes.lower, bytes.upper, bytes.title, lambda b: b])


@st.composite
def header(draw: st.DrawFn, names: tuple[str, ...] = ALLOWED) -> tuple[bytes, bytes]:
    """One header the fast path accepts: an allowed name in any case, a printable value."""
    name = draw(st.sampled_from(names))
    value = draw(st.one_of(st.sampled_from(VALUES.get(name, [b"x"])), PRINTABLE))
    return draw(NAME_CASE)(name.encode()), value


@dataclass
class Request:
    """A request as parts, so a mutation can change one part and leave the others valid."""

    method: bytes = b"GET"
    path: bytes = b"/health"
    version: bytes = b"HTTP/1.1"
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    sp: bytes = b" "  # between the parts of the request line
    ows: bytes = b" "  # after each header's colon
    eol: bytes = CRLF
    lead: bytes = b""  # before the request line

    def __bytes__(self) -> bytes:
        line = self.sp.join(p for p in (self.method, self.path, self.version) if p)
        lines = [line] + [n + b":" + self.ows + v if n is not None else v for n, v in self.headers]
        return self.lead + self.eol.join(lines) + self.eol + self.eol + self.body


@st.composite
def probe(draw: st.DrawFn, close: bool | None = None) -> Request:
    """A request the fast path answers itself: GET or HEAD of a probe path, HTTP/1.0 or 1.1, allowed headers."""
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.0"]))
    headers = draw(st.lists(header(), max_size=4, unique_by=lambda h: h[0].lower() if h[0].lower() == b"user-agent" else h))
    if version == b"HTTP/1.1" or draw(st.booleans()):
        headers.insert(draw(st.integers(0, len(headers))), (draw(NAME_CASE)(b"host"), draw(HOSTS)))
    if close is not None:  # pin how the connection ends (an open end costs a quiet period to be sure of)
        headers = [(n, v) for n, v in headers if n.lower() != b"connection"]
        if close and version == b"HTTP/1.1":
            headers.append((b"Connection", b"close"))
        elif not close and version == b"HTTP/1.0":
            headers.append((b"Connection", b"keep-alive"))
    return Request(method=draw(st.sampled_from([b"GET", b"HEAD"])), path=draw(PATHS), version=version,
                   headers=headers, ows=draw(st.sampled_from([b"", b" ", b"  ", b"\t"])))


ODD_HEADERS = [
    (b"Content-Length", b"0"), (b"Transfer-Encoding", b"chunked"), (b"Expect", b"100-continue"),
    (b"Upgrade", b"websocket"), (b"Cookie", b"a=b"), (b"X-Foo", b"bar"), (b"TE", b"trailers"),
    (b"Content-Type", b"text/plain"), (b"Host", b"second"), (b"Bad Header", b"x"), (b"", b"x"),
    (None, b"NoColon"), (None, b" folded: x"), (b"Host ", b"x"), (b"Accept", b"caf\xc3\xa9"),
    (b"Accept", b"a\x00b"), (b"Accept", b"a\x7fb"), (b"Accept", b"a\x01b"), (b"Accept", b"a\rb"),
    (b"User-Agent", b"\xff\xfe"), (b"Conn\xc3\xa9ction", b"close"), (b"Connection", b"close\x00"),
    (b"Keep-Alive", b"timeout=1"), (b"Proxy-Connection", b"close"), (b"Content-Length", b"x"),
    (b"Content-Length", b"-1"), (b"Authorization", b"Bearer abc"), (b"Accept", b"\t"),
]


@st.composite
def mutate(draw: st.DrawFn, req: Request) -> Request:
    """One or more changes that make a valid probe only nearly valid (or another request altogether)."""
    req = replace(req, headers=list(req.headers))
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["method", "path", "version", "sp", "header", "host", "eol", "lead", "big",
                                     "many", "body", "chunked", "value", "case"]))
        if kind == "method":
            req.method = draw(st.sampled_from([b"get", b"Get", b"POST", b"PUT", b"OPTIONS", b"DELETE", b"GETX",
                                               b"", b"PRI", b"CONNECT", b"G\x00T", b"G\xc3\x89T"]))
        elif kind == "path":
            req.path = draw(st.sampled_from([
                b"/Health", b"/health/", b"//health", b"/health?verbose", b"/health?", b"/health/mem",
                b"/health/nope", b"/healthz", b"/", b"*", b"http://x/health",
                b"/health#x", b"/he%61lth", b"/live?x=1", b"/nope", b"/health\x00", b"/h\xc3\xa9alth", b"",
                b"/ready/mem", b"/status/journal", b"/admin/drain", b"health", b"/./health", b"/../health"]))
        elif kind == "version":
            req.version = draw(st.sampled_from([b"HTTP/1.2", b"HTTP/2.0", b"http/1.1", b"HTTP/1.1 ", b"HTTP/1",
                                                b"", b"HTTP/0.9", b"HTTP/1.01", b"HTTP/1.10", b"HTTP/11",
                                                b"HTTP/1.1\x00", b"HTTP/3"]))
        elif kind == "sp":
            req.sp = draw(st.sampled_from([b"  ", b"\t", b"\x0b", b" \t"]))
        elif kind == "header":
            pos = draw(st.integers(0, len(req.headers)))
            req.headers.insert(pos, draw(st.sampled_from(ODD_HEADERS)))
        elif kind == "host":  # none, or a second
            hosts = [h for h in req.headers if h[0] is not None and h[0].lower() == b"host"]
            if hosts:
                req.headers = [h for h in req.headers if h not in hosts] if draw(st.booleans()) else (
                    req.headers + hosts)
            else:
                req.headers.append((b"Host", draw(HOSTS)))
        elif kind == "eol":
            req.eol = draw(st.sampled_from([b"\n", b"\r\r\n", b"\n\r"]))
        elif kind == "lead":
            req.lead = draw(st.sampled_from([CRLF, CRLF * 2, b"\n", b" ", b"\x00"]))
        elif kind == "big":  # one header around the front's 4096-byte head and aiohttp's 4096-byte field
            n = draw(st.sampled_from([4000, 4060, 4070, 4080, 4090, 4096, 4097, 4110, 8190, 8200, 12000]))
            req.headers.append((b"Accept", b"a" * n))
        elif kind == "many":  # around the 32-header limit both sides have
            n = draw(st.sampled_from([30, 31, 32, 33, 40, 200]))
            req.headers += [(b"Accept", b"x")] * n
        elif kind == "body":
            body = draw(st.sampled_from([b"", b"x", b"body", b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"]))
            req.headers.append((b"Content-Length", str(len(body)).encode()))
            req.body = body
        elif kind == "chunked":
            req.headers.append((b"Transfer-Encoding", b"chunked"))
            req.body = draw(st.sampled_from([b"0\r\n\r\n", b"4\r\nbody\r\n0\r\n\r\n", b"", b"zz\r\n"]))
        elif kind == "value":  # a byte the fast path does not take in one allowed header's value
            bad = draw(st.sampled_from([b"\x00", b"\x7f", b"\x80", b"\xff", b"\x1b", b"\x0b", b"\x0c"]))
            req.headers.append((b"User-Agent", b"probe" + bad + b"x"))
        elif kind == "case":
            req.headers = [(n.swapcase() if n else n, v.swapcase()) for n, v in req.headers]
    return req


INTERESTING = [b"\r", b"\n", b"\r\n", b"\x00", b" ", b"\t", b":", b"\x80", b"\xff", b"/", b"?", b"%", b",", b"a"]


@st.composite
def scramble(draw: st.DrawFn, data: bytes) -> bytes:
    """A few byte-level edits: inserts, deletions and replacements, weighted to HTTP's delimiters."""
    data = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        pos = draw(st.integers(0, len(data)))
        piece = draw(st.one_of(st.sampled_from(INTERESTING), st.binary(min_size=1, max_size=3)))
        op = draw(st.sampled_from(["insert", "delete", "replace"]))
        if op == "insert":
            data[pos:pos] = piece
        elif op == "delete":
            del data[pos:pos + len(piece)]
        else:
            data[pos:pos + len(piece)] = piece
    return bytes(data)


def valid() -> st.SearchStrategy[bytes]:
    return probe().map(bytes)


def near_valid() -> st.SearchStrategy[bytes]:
    return probe().flatmap(mutate).map(bytes)


def mutated() -> st.SearchStrategy[bytes]:
    return st.one_of(valid(), near_valid()).flatmap(scramble)


def any_request() -> st.SearchStrategy[bytes]:
    return st.one_of(valid(), near_valid(), mutated(), st.binary(max_size=64))


@st.composite
def chunked(draw: st.DrawFn, data: bytes) -> list[bytes]:
    """The stream as the server may read it: whole, one byte at a time, or cut at drawn points."""
    how = draw(st.sampled_from(["whole", "bytes", "cuts"]))
    if how == "whole" or len(data) < 2:
        return [data]
    if how == "bytes" and len(data) <= 200:
        return [data[i:i + 1] for i in range(len(data))]
    cuts = sorted(set(draw(st.lists(st.integers(1, len(data) - 1), min_size=1, max_size=6))))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


@st.composite
def pipeline(draw: st.DrawFn, parts: st.SearchStrategy[bytes]) -> bytes:
    """Several requests in one stream, maybe truncated, maybe ended by a probe that closes the connection."""
    data = b"".join(draw(st.lists(parts, min_size=1, max_size=4)))
    if draw(st.booleans()):
        data = data[:draw(st.integers(0, len(data)))]
    if draw(st.booleans()):
        data += bytes(draw(probe(close=True)))
    return data


# -- the properties -----------------------------------------------------------------------------

# Divergences the fuzz found, kept as explicit examples.
AFTER_CLOSE = b"GET /health HTTP/1.0\r\n\r\nGET /live HTTP/1.1\r\nHost: x\r\n\r\n"  # aiohttp: one 400 for both
BOTH_TOKENS = b"GET /health HTTP/1.0\r\nconnection:keep-alive, close\r\n\r\n"  # the front closed, aiohttp not
TWO_AGENTS = b"GET /health HTTP/1.1\r\nHost: x\r\nUser-Agent: a\r\nUser-Agent: a\r\n\r\n"  # the front said 200
# and b"\x00" (or any head that cannot become a probe): the front held it for read_timeout, aiohttp says 400

situations = st.sampled_from(SITUATIONS)


@FUZZ
@example(situation="up", data=(AFTER_CLOSE, [AFTER_CLOSE]), follow=False)
@example(situation="up", data=(BOTH_TOKENS, [BOTH_TOKENS]), follow=True)
@given(situation=situations, data=st.lists(valid(), min_size=1, max_size=5).map(b"".join).flatmap(
    lambda d: st.tuples(st.just(d), chunked(d))), follow=st.booleans())
def test_probes_get_aiohttps_answers_from_the_fast_path(pair: Pair, situation: str, data: tuple, follow: bool) -> None:
    """Pipelined probes, however split, get aiohttp's answers and keep-alive, and the fast path writes them."""
    fast = check(pair, situation, data[1], follow)
    assert all(fast_answered(fast.raw)), fast.raw


@FUZZ
@example(situation="up", data=(b"\x00", [b"\x00"]), follow=False)
@example(situation="up", data=(b"GET /health HTTP/1.1\r\nHost: x\r\nAccept: a\x00", [b"GET /health HTTP/1.1\r\n",
                                                                                 b"Host: x\r\nAccept: a\x00"]),
         follow=True)
@example(situation="drain404", data=(TWO_AGENTS, [TWO_AGENTS]), follow=False)
@given(situation=situations, data=pipeline(any_request()).flatmap(lambda d: st.tuples(st.just(d), chunked(d))),
       follow=st.booleans())
def test_odd_requests_get_aiohttps_answers(pair: Pair, situation: str, data: tuple, follow: bool) -> None:
    """Near-valid, mutated and arbitrary requests, pipelined with probes, split or truncated, are answered as
    aiohttp alone answers them, with the same keep-alive and hand-over, no error and no hang."""
    # aiohttp alone is no stable reference for an HTTP/0.9 request line (`GET /` with no version): what it
    # answers to the bytes after one depends on whether its handler ran between two reads. The front hands
    # such a line to aiohttp untouched, so there is nothing of its own to compare.
    assume(HTTP09.search(data[0]) is None)
    check(pair, situation, data[1], follow)


@settings(FUZZ, max_examples=max(BUDGET // 4, 20))
@given(situation=situations, data=st.one_of(
    st.integers(50, 400).flatmap(lambda n: st.lists(valid(), min_size=n, max_size=n)).map(b"".join),
    st.integers(4000, 70000).map(lambda n: b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % n
                                 + b"x" * n),
    st.integers(4080, 20000).map(lambda n: b"GET /health HTTP/1.1\r\nHost: " + b"h" * n + b"\r\n\r\n"),
    st.integers(4080, 20000).map(lambda n: b"GET /" + b"a" * n + b" HTTP/1.1\r\nHost: x\r\n\r\n"),
    st.integers(1, 5000).map(lambda n: b"GET /health HTTP/1.1\r\n" + b"Accept: x\r\n" * n + b"\r\n"),
    st.binary(min_size=4000, max_size=70000),
).flatmap(lambda d: st.tuples(st.just(d), chunked(d))))
def test_oversized_streams_get_aiohttps_answers(pair: Pair, situation: str, data: tuple) -> None:
    """Long pipelines, huge heads, lines and bodies, and long garbage are answered as aiohttp answers them."""
    check(pair, situation, data[1])


SPLIT = {
    "probes": b"GET /health HTTP/1.1\r\nHost: x\r\n\r\nHEAD /live HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
              b"GET /ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    "hand-over": b"GET /live HTTP/1.1\r\nHost: x\r\n\r\nGET /health/mem HTTP/1.1\r\nHost: x\r\n\r\n"
                 b"GET /health HTTP/1.0\r\n\r\n",
    "bare LF": b"GET /live HTTP/1.1\r\nHost: x\r\n\r\nGET /health HTTP/1.1\nHost: x\nConnection: close\n\n",
}


@pytest.mark.parametrize("name", SPLIT)
def test_a_stream_split_anywhere_gets_aiohttps_answers(pair: Pair, name: str) -> None:
    """A stream cut in two at every byte boundary gets the same answers as aiohttp alone, each time."""
    data = SPLIT[name]
    for i in range(1, len(data)):
        check(pair, "up", [data[:i], data[i:]])

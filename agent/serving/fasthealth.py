"""A minimal HTTP/1.1 responder for /health, /ready, /live and /metrics in front of aiohttp; aiohttp gets the rest."""

from __future__ import annotations

import asyncio
import email.utils
import logging
import re
from collections.abc import Awaitable, Callable
from typing import cast

from agent import logs
from agent.serving.decision import health_response, live_response
from agent.serving.guard import Guard
from agent.state import AgentState

# Why this exists: load balancers and orchestrators probe /health many times a second per node, and aiohttp
# spends ~100 us of Python per request on routing, Request/Response objects and header multidicts. This
# responder answers the probe paths from precomputed bytes (see bench/RESULTS.md for the numbers). It also
# answers GET /metrics, rendered per request as aiohttp's handler does, so that a node its load balancer
# probes and Prometheus scrapes never needs aiohttp at all (the listener imports it on first need).
#
# It is deliberately narrow. It answers only a request that HEAD_RE matches whole: GET or HEAD of one of
# the four paths, HTTP/1.0 or 1.1, at most MAX_HEAD bytes, and only header names from ALLOWED with plain
# printable values (so no body, no upgrade, no Expect), one Host (required by HTTP/1.1), at most one
# User-Agent (aiohttp refuses a second of either, RFC 9110 singletons). Anything else (other paths or
# methods, query strings, bodies, malformed or oversized heads, unknown headers, bare LF line ends), and a
# head still arriving as soon as it cannot become such a request, hands the connection, from that request
# on, to aiohttp's own protocol, which parses, rejects and answers it exactly as it would without this
# front. So strictness about odd input stays with aiohttp.

PATHS = {b"/health": "health", b"/ready": "health", b"/live": "live", b"/metrics": "metrics"}
MAX_HEAD = 4096  # bytes of a request head this front answers; longer ones (and partial ones) go to aiohttp
MAX_HEADERS = 32
TOO_MANY = (b"HTTP/1.1 429 Too Many Requests\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 18\r\n"
            b"Retry-After: 1\r\nConnection: close\r\n\r\ntoo many requests\n")
HAND_OVER_BATCH = 16  # connections waiting for aiohttp's load handed over per turn of the loop
SWEEP = 1.0  # seconds: the Date header's age at most, and between read-timeout checks of open connections
FAILED_EVERY = 60.0  # seconds: a load of aiohttp that keeps failing is logged at most this often

ALLOWED = (
    "user-agent", "accept", "accept-encoding", "accept-language", "connection", "keep-alive", "cache-control",
    "pragma", "authorization", "referer", "x-forwarded-for", "x-forwarded-host", "x-forwarded-proto",
    "x-real-ip", "x-request-id", "traceparent", "tracestate",
    "x-prometheus-scrape-timeout-seconds",  # on every scrape Prometheus (and vmagent) sends
)
_OWS = rb"[ \t]*"
_HOST = rb"\r\n(?i:host):" + _OWS + rb"[A-Za-z0-9._~%!$&'()*+,;=:\[\]-]*" + _OWS
_OTHER = rb"\r\n(?i:" + "|".join(ALLOWED).encode() + rb"):[\t\x20-\x7e]*"
def is_probe(method: str, target: str) -> bool:
    """A GET or HEAD of /health, /ready, /live or /health/<name>, /ready/<name>, query and all: what a load
    balancer or an orchestrator probes (max_request_rate counts these at a tenth)."""
    if method not in ("GET", "HEAD"):
        return False
    path = target.partition("?")[0]
    return path in ("/health", "/ready", "/live") or path.startswith(("/health/", "/ready/"))


HEAD_RE = re.compile(
    rb"(GET|HEAD) (/health|/ready|/live|/metrics|/(?:health|ready)/[A-Za-z0-9][A-Za-z0-9_.-]{0,62}) HTTP/1\.([01])((?:"
    + _HOST + b"|" + _OTHER + rb")*)"
)
REASONS = {200: b"OK", 404: b"Not Found", 503: b"Service Unavailable"}
TEXT = b"text/plain; charset=utf-8"
METRICS_TYPE = b"text/plain; version=0.0.4; charset=utf-8"  # as the aiohttp handler (http_api.metrics) says
REQUEST_LINES = tuple(b"%s %s HTTP/1.%d" % (m, p, v) for m in (b"GET", b"HEAD") for p in PATHS for v in (0, 1))
NAMES = (b"host", *(n.encode() for n in ALLOWED))


def overdone(lower: bytes) -> bool:
    """A lower-cased header block (lines led by CRLF) with a singleton twice or too many headers."""
    hosts, agents = lower.count(b"\r\nhost:"), lower.count(b"\r\nuser-agent:")
    return hosts > 1 or agents > 1 or lower.count(b"\r\n") > MAX_HEADERS


def may_be_probe(part: bytes) -> bool:
    """Whether a head still arriving (no CRLF CRLF yet) can become one HEAD_RE matches.

    What cannot goes to aiohttp at once, which may answer it before it is complete (a 400 for a bad
    request line or header byte), as it would without this front.
    """
    if overdone(part.lower()):
        return False
    done, sep, line = part.rpartition(b"\r\n")  # the lines that have come, and the one arriving
    if sep and line in (b"", b"\r"):
        return HEAD_RE.fullmatch(done) is not None
    whole = line.endswith(b"\r")  # all but its LF
    line = line.removesuffix(b"\r")
    if whole or b":" in line:  # a whole line, or a header's value so far: a prefix of a value is a value
        return HEAD_RE.fullmatch(done + sep + line) is not None
    if not sep:
        return any(r.startswith(line) for r in REQUEST_LINES)
    return HEAD_RE.fullmatch(done) is not None and any(n.startswith(line.lower()) for n in NAMES)


def parse_connection(headers: bytes) -> set[bytes]:
    """The lower-cased tokens of every Connection header in a header block (lines led by CRLF)."""
    tokens: set[bytes] = set()
    for line in headers.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.lower() == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b","))
    return tokens


def render(code: int, body: bytes, head: bool, close: bool, keep_alive_header: bool, date: bytes,
           content_type: bytes = TEXT) -> bytes:
    """The full response bytes; HEAD gets the same headers as GET and no body."""
    lines = [
        b"HTTP/1.1 %d %s" % (code, REASONS[code]),
        b"Content-Type: " + content_type,
        b"Content-Length: %d" % len(body),
        b"Cache-Control: no-store",
        b"Date: " + date,
    ]
    if close:
        lines.append(b"Connection: close")
    elif keep_alive_header:
        lines.append(b"Connection: keep-alive")
    return b"\r\n".join(lines) + b"\r\n\r\n" + (b"" if head else body)


class FastHealth:
    """The listening socket, the probe connections it still owns and the cache of response bytes.

    Invariant: everything here runs on the event loop's thread. `conns` holds the connections accepted and
    not handed to aiohttp; aiohttp's server closes the others. `guard` counts a connection from accept
    until it is lost or handed over (the handler that takes it over counts it from then on). `fallback`,
    aiohttp's protocol factory, is None until `load` has built it: a connection to hand over meanwhile
    waits in `waiting`, not reading, and is handed over once it is there.
    """

    def __init__(self, state: AgentState, guard: Guard, load: Callable[[], Awaitable[None]] | None = None,
                 fallback: Callable[[], asyncio.Protocol] | None = None,
                 metrics: Callable[[], bytes] | None = None):
        """`guard` is the HTTP listener's: one connection cap and deadline for both front and aiohttp.
        `load` sets `fallback` (the listener's loader; None when `fallback` is given); `metrics` renders
        the exposition (None: aiohttp serves /metrics)."""
        self.state = state
        self.guard = guard
        self.load = load
        self.fallback = fallback
        self.metrics = metrics
        self.conns: set[HealthProtocol] = set()
        self.waiting: set[HealthProtocol] = set()
        self._loader: asyncio.Task[None] | None = None
        self._failed = 0  # loads failed since the last line that said so (every request retries one)
        self._failed_quiet_until = -1.0  # loop time before which a failed load is only counted
        self.loop = asyncio.get_running_loop()
        self._cache: dict[tuple, bytes] = {}
        self._date = b""
        self._date_until = -1.0  # loop time after which the Date header (and so the cache) is renewed
        self._sweeper: asyncio.TimerHandle | None = None  # armed only while there are connections

    def protocol(self) -> HealthProtocol:
        """The protocol factory for the listening socket."""
        return HealthProtocol(self)

    def close(self) -> None:
        """Close the connections still here (aiohttp closes those it took over)."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if self._loader is not None:
            self._loader.cancel()
            self._loader = None
        for conn in list(self.conns):
            conn.transport.close()

    def wait_for_fallback(self, conn: HealthProtocol) -> None:
        """Hand `conn` over once aiohttp is loaded; start loading it if nobody has."""
        self.waiting.add(conn)
        if self._loader is None:
            self._loader = asyncio.create_task(self._load(), name="http-hand-over")

    async def _load(self) -> None:
        try:
            if self.load is None:
                raise RuntimeError("no aiohttp fallback and no loader for it")
            await self.load()
        except Exception as e:  # the waiting clients are closed; the next request that needs aiohttp retries
            # Any client can make every request retry it: one line a minute at most, counting the rest.
            self._failed += 1
            now = self.loop.time()
            if now >= self._failed_quiet_until:
                logs.event("http_app_load_failed", logging.ERROR, error=repr(e), failures=self._failed)
                self._failed, self._failed_quiet_until = 0, now + FAILED_EVERY
        finally:
            self._loader = None
        # What waited is handed over (or closed) a batch per turn of the loop: hundreds of clients queued
        # behind the load (a flood's first requests) parsed by aiohttp in one callback would stall the
        # heartbeat past max_loop_lag, and the node would fail closed for junk traffic.
        while self.waiting:
            for _ in range(min(HAND_OVER_BATCH, len(self.waiting))):
                conn = self.waiting.pop()
                if self.fallback is None:
                    conn.transport.abort()
                else:
                    conn.resume_hand_over()
            if self.waiting:
                await asyncio.sleep(0)

    def admit(self, conn: HealthProtocol) -> None:
        self.conns.add(conn)
        if self._sweeper is None:
            self._sweeper = self.loop.call_later(SWEEP, self._sweep)

    def _sweep(self) -> None:
        """Once a second while connections are open: drop clients past their read deadline. With none open
        nothing runs: an idle agent has no timer here."""
        now = self.loop.time()
        for conn in [c for c in self.conns if now > c._due]:
            self.guard.drop(conn, "deadline")
        self._sweeper = self.loop.call_later(SWEEP, self._sweep) if self.conns else None

    def kind_of(self, path: bytes) -> str | None:
        """"health", "live", "metrics", a verdict group's name, or None: /health/<check> goes to aiohttp,
        and so does /metrics when this front renders no metrics."""
        kind = PATHS.get(path)
        if kind is not None:
            return kind if kind != "metrics" or self.metrics is not None else None
        name = path.split(b"/", 2)[2].decode()
        return "group:" + name if name in self.state.snapshot.groups else None

    def answer(self, kind: str, head: bool, close: bool, http10: bool) -> bytes:
        """The response to one probe: agent.serving.decision's answer, as http_api's handlers give it; or
        to one scrape, the exposition as aiohttp's handler gives it."""
        group = kind[6:] if kind.startswith("group:") else None
        now = self.loop.time()
        if now >= self._date_until:  # at most a second old, as aiohttp's own Date header
            self._date = email.utils.formatdate(usegmt=True).encode()
            self._date_until = now + SWEEP
            self._cache.clear()
        if kind == "metrics":
            assert self.metrics is not None  # kind_of says "metrics" only then
            return render(200, self.metrics(), head, close, http10, self._date, METRICS_TYPE)
        answer = self.state.answer(now, group)
        code, text = live_response(answer) if kind == "live" else health_response(answer)
        body = text.encode()
        key = (code, body, head, close, http10)
        resp = self._cache.get(key)
        if resp is None:
            resp = self._cache[key] = render(code, body, head, close, http10, self._date)
        return resp


class HealthProtocol(asyncio.Protocol):
    """One client connection: answers probe requests itself until one is not a probe, then forwards to aiohttp.

    Once `inner` (aiohttp's RequestHandler) is set, every transport event goes to it and this object only
    relays; the connection never comes back.
    """

    __slots__ = ("front", "transport", "inner", "buf", "_due", "closing", "held", "paused", "backlog")

    def __init__(self, front: FastHealth):
        self.front = front
        # self.transport: set by connection_made, before any other call (asyncio's protocol contract)
        self.inner: asyncio.Protocol | None = None
        self.buf = b""
        self._due = 0.0  # the next complete request must arrive by then (read_timeout after the last answer)
        self.closing = False
        self.held = False  # waiting for aiohttp to load, to hand over to it; not reading meanwhile
        self.paused = False  # the client does not read our answers (pause_writing)
        # Requests pipelined behind a scrape wait in `buf` for the next turn of the loop, not reading
        # meanwhile (as aiohttp stops at its queue's limit): a client cannot make `buf` grow without bound,
        # and its EOF is seen only once they are answered.
        self.backlog = False

    transport: asyncio.Transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        front = self.front
        self.transport = cast(asyncio.Transport, transport)  # a stream transport: this is a TCP/unix server
        if front.guard.refuse(self.transport):
            self.closing = True
            return
        self._due = front.loop.time() + front.guard.read_timeout
        front.admit(self)
        front.guard.admit(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.front.conns.discard(self)
        self.front.waiting.discard(self)
        self.front.guard.open.pop(self, None)
        if self.inner is not None:
            self.inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.inner is not None:
            self.inner.data_received(data)
            return
        if self.closing:
            return
        buf = self.buf + data if self.buf else data
        if self.held:
            self.buf = buf
            return
        pos = 0
        out: list[bytes] = []
        scrape = False
        while True:
            end = buf.find(b"\r\n\r\n", pos)
            if end < 0:
                break
            if end - pos > MAX_HEAD:
                break
            m = HEAD_RE.fullmatch(buf, pos, end)
            if m is None:
                break
            headers = m.group(4)
            close = http10 = m.group(3) == b"0"
            lower = headers.lower()
            if overdone(lower) or (not http10 and b"\r\nhost:" not in lower):
                break
            if b"\r\nconnection:" in lower:
                tokens = parse_connection(headers)
                # As aiohttp (llhttp) decides: HTTP/1.0 stays open on keep-alive, even beside close.
                close = b"keep-alive" not in tokens if http10 else b"close" in tokens
            kind = self.front.kind_of(m.group(2))
            if kind is None:
                break
            if kind == "metrics":
                if out:  # what came before it goes out first; the scrape on the next turn
                    scrape = True
                    break
                if not self.front.guard.within_rate(self.transport, self.front.loop.time(), False):
                    self.closing = True  # past max_request_rate, as aiohttp's middleware refuses it
                    self.transport.write(TOO_MANY)
                    self.transport.close()
                    return
                scrape = True
            out.append(self.front.answer(kind, m.group(1) == b"HEAD", close, http10))
            pos = end + 4
            if close:
                self.closing = True
                break
            if scrape:  # one render per turn of the loop: pipelined scrapes cannot stall it
                break
        if out:
            self.transport.write(b"".join(out) if len(out) > 1 else out[0])
            self._due = self.front.loop.time() + self.front.guard.read_timeout
        if self.closing:
            self.transport.close()
            return
        rest = buf[pos:] if pos else buf
        if scrape and rest:  # a scrape, or more pipelined behind one: on the next turn of the loop
            self.buf = rest
            if not self.backlog:
                self.backlog = True
                self.transport.pause_reading()
            if not self.paused:
                self.front.loop.call_soon(self._more)
            return
        if self.backlog:
            self.backlog = False
            if not self.paused:
                self.transport.resume_reading()
        if rest and (end >= 0 or len(rest) > MAX_HEAD or not may_be_probe(rest)):
            self._hand_over(rest)  # not a probe, too long, or cannot become one: aiohttp decides
            return
        self.buf = rest

    def _hand_over(self, rest: bytes) -> None:
        line = rest.split(b"\r\n", 1)[0].split(b" ")
        probe = len(line) > 1 and is_probe(line[0].decode("latin-1"), line[1].decode("latin-1"))
        if not self.front.guard.within_rate(self.transport, self.front.loop.time(), probe, take=False):
            self.closing = True  # past max_request_rate: refused here, before aiohttp parses a byte of it
            self.transport.write(TOO_MANY)
            self.transport.close()
            return
        if self.front.fallback is None:  # aiohttp not loaded yet: wait for it, reading nothing more
            self.buf, self.held = rest, True
            self.transport.pause_reading()
            self.front.wait_for_fallback(self)
            return
        self._give(rest)

    def _give(self, rest: bytes) -> None:
        """aiohttp takes the connection as if it had owned it from the start: reading (it stops by itself
        when it must), and told when the client does not read, so that it waits before writing more."""
        assert self.front.fallback is not None
        self.buf = b""
        self.front.conns.discard(self)
        self.front.guard.open.pop(self, None)
        if self.held or self.paused:
            self.held = False
            self.transport.resume_reading()  # takes effect on a later turn of the loop, after the hand-over
        self.inner = inner = self.front.fallback()
        inner.connection_made(self.transport)
        if self.paused:
            inner.pause_writing()
        inner.data_received(rest)

    def resume_hand_over(self) -> None:
        """aiohttp is loaded: hand over what waited, and read again."""
        if not self.held or self.transport is None or self.transport.is_closing():
            return
        self._give(self.buf)

    def _more(self) -> None:
        """The requests pipelined behind a scrape, a turn of the loop later."""
        if self.inner is None and self.buf and not self.held and not self.closing and \
                self.transport is not None and not self.transport.is_closing():
            self.data_received(b"")

    def eof_received(self) -> bool | None:
        if self.inner is not None:
            return self.inner.eof_received()
        return None  # every complete request was answered: close

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()
        else:
            self.paused = True
            self.transport.pause_reading()  # a client that pipelines without reading gets no more answers

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()
            return
        self.paused = False
        if not self.closing and not self.held:
            if not self.backlog:  # else reading resumes once the backlog is answered
                self.transport.resume_reading()
            if self.buf:
                self.front.loop.call_soon(self._more)

"""The HTTP listener: a connection cap, a per-request deadline, 431 for oversized heads, quiet rejections."""

from __future__ import annotations

import asyncio
import collections
import errno
import functools
import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable, Iterator
from operator import attrgetter
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import LineTooLong
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from agent import logs
from agent.access import admitted
from agent.config import ServerConfig
from agent.serving.fasthealth import FastHealth, is_probe
from agent.state import AgentState

# A load balancer's probe is one short line and a handful of headers; anything near these is hostile.
MAX_LINE = 4096  # the request line
MAX_FIELD = 4096  # one header, name and value
MAX_HEADERS = 32
BUCKETS = 4096  # client addresses whose request rate is remembered (the least recent are forgotten first)
PROBE_COST = 0.1  # of a token: what a probe answered by aiohttp costs against max_request_rate
RESOLVE_TIMEOUT = 5.0  # a listen address given as a name: how long its lookup may take before start fails


async def listen_tcp(start: Callable[..., Awaitable[Any]], host: str, port: int, **kw: Any) -> Any:
    """`start(...)` (loop.create_server or asyncio.start_server, the protocol bound) on HOST:PORT.

    An IP address is bound here, numerically: uvloop would hand even a numeric host to getaddrinfo in
    libuv's pool of 4 threads, where lookups stuck on a dead resolver hold every worker for 30 s and more,
    and the listener would wait behind them. A name goes to the loop's resolver, bounded in time."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST | socket.AI_PASSIVE)[0]
    except socket.gaierror:
        try:
            async with asyncio.timeout(RESOLVE_TIMEOUT):
                return await start(host=host, port=port, reuse_address=True, **kw)
        except TimeoutError:
            raise OSError(errno.ETIMEDOUT, f"resolving {host!r} took over {RESOLVE_TIMEOUT:g}s "
                                           "(an IP address needs no resolver)") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:  # as asyncio does: "::" is IPv6 alone; "0.0.0.0" is IPv4
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(addr)
        return await start(sock=sock, **kw)
    except BaseException:
        sock.close()
        raise


def _too_large(exc: BaseException | None) -> bool:
    # aiohttp reports every oversized head as a 400; the C and Python parsers raise LineTooLong for a
    # long line or header and a BadHttpMessage that says so for too many headers.
    return isinstance(exc, LineTooLong) or "too many headers" in str(exc).lower()


class Guard:
    """The open connections and the limits they live under; shared by every Handler of one listener.

    Invariant: `open` holds at most `limit` connections. At the cap a new connection evicts the one
    that has gone longest without completing a request (idle keep-alives and slow or stuck clients
    first), so thousands of idle connections can never lock a load balancer's probe out.
    """

    def __init__(self, server: ServerConfig):
        self.open: dict[Handler, None] = {}
        self.dropped: collections.Counter = collections.Counter()  # reason -> connections closed by us
        self.bad: collections.Counter = collections.Counter()  # status -> malformed requests answered
        self._buckets: collections.OrderedDict[str, tuple[float, float]] = collections.OrderedDict()  # see within_rate
        self.configure(server)

    def configure(self, server: ServerConfig, rate: float | None = None) -> None:
        """Limits from [server]; a reload applies them to connections accepted from then on. `rate`
        overrides server.max_request_rate (the admin socket's guard: 0, operators are not rate-limited)."""
        self.limit = server.max_connections
        self.read_timeout = server.read_timeout
        self.allow_from = server.allow_from
        self.rate = server.max_request_rate if rate is None else rate
        self.fast_health = server.fast_health

    def within_rate(self, transport: asyncio.BaseTransport | None, now: float, probe: bool,
                    take: bool = True) -> bool:
        """Whether one more request may go to aiohttp from this client's address: a token bucket per address
        (`rate` a second, a second's worth of burst; the BUCKETS most recent addresses are kept). A probe
        (a /health, /ready or /live the fast responder could not take, for an unusual header, say) costs a
        tenth: a load balancer's checks are never refused at rates it sends, and a flood of anything costs
        the loop a bounded share. `take=False` looks without taking (the fast responder, before aiohttp's
        own look at the same request). The exact probes the fast responder answers never ask."""
        if not self.rate or transport is None or (probe and not self.fast_health):
            return True  # with fast_health = false aiohttp answers every probe: they are never limited
        peer = transport.get_extra_info("peername")
        key = peer[0] if isinstance(peer, tuple) and peer else ""
        cost = PROBE_COST if probe else 1.0
        tokens, last = self._buckets.pop(key, (self.rate, now))
        tokens = min(self.rate, tokens + (now - last) * self.rate)
        ok = tokens >= cost
        self._buckets[key] = (tokens - cost if ok and take else tokens, now)
        if len(self._buckets) > BUCKETS:
            self._buckets.popitem(last=False)
        if not ok:
            self.dropped["rate"] += 1
        return ok

    def refuse(self, transport: asyncio.BaseTransport) -> bool:
        """Close a connection from outside `allow_from` without a reply (and before it can evict anyone)."""
        if admitted(transport, self.allow_from):
            return False
        self.dropped["refused"] += 1
        transport.abort()  # type: ignore[attr-defined]
        return True

    def admit(self, handler: Handler) -> None:
        while len(self.open) >= self.limit:
            victim = min(self.open, key=attrgetter("_due"))
            self.drop(victim, "capacity")
        self.open[handler] = None

    def drop(self, handler: Handler, reason: str) -> None:
        self.open.pop(handler, None)
        self.dropped[reason] += 1
        if handler.transport is not None:
            handler.transport.abort()  # not close(): that waits for a client that may never read

    # -- metrics, read at scrape time ------------------------------------------------------------

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("healthgate_http_connections", "open HTTP connections", value=len(self.open))
        dropped = CounterMetricFamily("healthgate_http_dropped_connections",
                                      "connections closed by the agent: capacity (evicted at max_connections), "
                                      "deadline (no complete request within read_timeout), refused (a client "
                                      "outside allow_from) or rate (429 past max_request_rate)", labels=["reason"])
        for reason in ("capacity", "deadline", "refused", "rate"):
            dropped.add_metric([reason], float(self.dropped[reason]))
        yield dropped
        bad = CounterMetricFamily("healthgate_http_bad_requests", "malformed requests refused, by status",
                                  labels=["code"])
        for code, n in sorted(self.bad.items()):
            bad.add_metric([str(code)], float(n))
        yield bad


class Handler(web.RequestHandler):
    """aiohttp's protocol with a deadline: each request must arrive and be answered within read_timeout
    of connecting or of the previous response, else the connection is aborted (slowloris, a client that
    stops reading). The deadline moves only when a response completes, so nothing runs per byte read.
    """

    __slots__ = ("_guard", "_due", "_deadline", "_refused")

    def __init__(self, manager: web.Server, guard: Guard, **kwargs: Any):
        super().__init__(manager, **kwargs)
        self._guard = guard
        self._due = 0.0
        self._deadline: asyncio.TimerHandle | None = None
        self._refused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._guard.refuse(transport):
            self._refused = True
            return
        self._due = self._loop.time() + self._guard.read_timeout
        self._guard.admit(self)
        self._deadline = self._loop.call_at(self._due, self._expire)
        super().connection_made(transport)

    @property
    def guard(self) -> Guard:
        return self._guard

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._refused:  # aiohttp never saw it
            return
        self._guard.open.pop(self, None)
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        super().connection_lost(exc)

    def log_access(self, request: Any, response: Any, time: float | None) -> None:
        # Called once per completed response: the cheapest hook there is for "a request was served".
        self._due = self._loop.time() + self._guard.read_timeout
        super().log_access(request, response, time)

    def _expire(self) -> None:
        self._deadline = None
        if self.transport is None:
            return
        if self._loop.time() < self._due:  # served since the timer was set: wait for the new deadline
            self._deadline = self._loop.call_at(self._due, self._expire)
            return
        self._guard.drop(self, "deadline")

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        """Malformed requests get a fixed short answer and a counter, never a log line per request
        (a hostile client must not be able to flood the logs) and never the client's bytes echoed."""
        if status == 400:
            status, text = (431, "request header fields too large\n") if _too_large(exc) else (400, "bad request\n")
            self._guard.bad[status] += 1
        else:
            logs.event("http_handler_error", logging.ERROR, path=request.path, status=status, error=repr(exc))
            text = "internal error\n"
        resp = web.Response(status=status, text=text)
        resp.force_close()
        return resp


@web.middleware
async def within_rate(request: web.Request, handler: Any) -> web.StreamResponse:
    """max_request_rate, for the requests that reach aiohttp: past it, 429 and the connection is closed."""
    guard = getattr(request.protocol, "guard", None)
    if guard is not None and not guard.within_rate(request.transport, asyncio.get_running_loop().time(),
                                                   is_probe(request.method, request.raw_path)):
        resp = web.Response(status=429, text="too many requests\n", headers={"Retry-After": "1"})
        resp.force_close()
        return resp
    return await handler(request)


def _clear_stale(path: str) -> None:
    """Remove the socket file a dead agent left; refuse to touch a live agent's socket or any other file."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(0.5)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)
        return
    except OSError:
        pass
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, f"another process answers on {path}")


class Listener:
    """The HTTP server of one agent: aiohttp's runner for the app, our own protocol factory for the socket."""

    def __init__(self, server: ServerConfig, state: AgentState):
        self.guard = Guard(server)
        self.state = state
        self.fast_health = server.fast_health
        self._fast: FastHealth | None = None
        self.app: web.Application | None = None
        self._runner: web.AppRunner | None = None
        self._server: asyncio.AbstractServer | None = None
        # The admin socket has a guard of its own: a flood on the TCP port cannot evict an operator.
        self.local_guard = Guard(server)
        self.local_guard.configure(server, rate=0)
        self._local: asyncio.AbstractServer | None = None
        self._local_path: str | None = None
        self._local_id: tuple[int, int] | None = None

    def _factory(self, guard: Guard) -> Any:
        assert self._runner is not None
        manager, loop = self._runner.server, asyncio.get_running_loop()

        def factory() -> Handler:
            return Handler(manager, guard, loop=loop, access_log=None, keepalive_timeout=guard.read_timeout,
                           lingering_time=0, max_line_size=MAX_LINE, max_field_size=MAX_FIELD,
                           max_headers=MAX_HEADERS)

        return factory

    async def start(self, app: web.Application, host: str, port: int) -> tuple[str, int]:
        """Listen; returns the bound address (for port 0). On failure nothing is left open."""
        loop = asyncio.get_running_loop()
        self.app = app
        if within_rate not in app.middlewares:
            app.middlewares.insert(0, within_rate)  # first: a refused request costs nothing more
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await self._runner.setup()
        guard = self.guard
        factory = self._factory(guard)
        protocol: Any = factory
        if self.fast_health:  # probes answered from precomputed bytes; anything else goes on to aiohttp
            self._fast = FastHealth(self.state, factory, guard)
            protocol = self._fast.protocol
        try:
            self._server = await listen_tcp(functools.partial(loop.create_server, protocol), host, port,
                                            backlog=1024)
        except BaseException:
            await self.stop()
            raise
        return self._server.sockets[0].getsockname()[:2]

    async def start_unix(self, path: str) -> None:
        """Serve the same app on a unix socket of mode 0660, after start(). Its clients are the node's
        operators: the file's owner and group, as for HAProxy's stats socket or Docker's. OSError when a
        live agent already answers there or the path cannot be bound; a stale socket file is replaced."""
        loop = asyncio.get_running_loop()
        directory = os.path.dirname(path) or "."
        os.makedirs(directory, exist_ok=True)
        _clear_stale(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # umask, not a chmod after bind: no moment in which the socket is open to others. The loop's
            # thread does nothing else meanwhile, and nothing else here forks from other threads.
            old = os.umask(0o117)
            try:
                sock.bind(path)
            finally:
                os.umask(old)
            os.chmod(path, 0o660)
            st = os.stat(path)
            self._local = await loop.create_unix_server(self._factory(self.local_guard), sock=sock, backlog=64)
        except BaseException:
            sock.close()
            raise
        self._local_path, self._local_id = path, (st.st_dev, st.st_ino)

    async def stop(self) -> None:
        if self._local is not None:
            self._local.close()
            self._local = None
            try:  # only our own file: another agent may have replaced it since
                st = os.stat(self._local_path)
                if (st.st_dev, st.st_ino) == self._local_id:
                    os.unlink(self._local_path)
            except OSError:
                pass
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._fast is not None:
            self._fast.close()  # its own connections; aiohttp's runner closes those handed over
            self._fast = None
        if self._runner is not None:
            await self._runner.cleanup()  # closes idle connections, lets in-flight requests finish
            self._runner = None

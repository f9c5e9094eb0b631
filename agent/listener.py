"""The HTTP listener: a connection cap, a per-request deadline, 431 for oversized heads, quiet rejections."""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Iterator
from operator import attrgetter
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import LineTooLong
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from agent import logs
from agent.config import ServerConfig
from agent.fasthealth import FastHealth
from agent.state import AgentState

# A load balancer's probe is one short line and a handful of headers; anything near these is hostile.
MAX_LINE = 4096  # the request line
MAX_FIELD = 4096  # one header, name and value
MAX_HEADERS = 32


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
        self.configure(server)

    def configure(self, server: ServerConfig) -> None:
        """Limits from [server]; a reload applies them to connections accepted from then on."""
        self.limit = server.max_connections
        self.read_timeout = server.read_timeout

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
                                      "connections closed by the agent: capacity (evicted at max_connections) "
                                      "or deadline (no complete request within read_timeout)", labels=["reason"])
        for reason in ("capacity", "deadline"):
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

    __slots__ = ("_guard", "_due", "_deadline")

    def __init__(self, manager: web.Server, guard: Guard, **kwargs: Any):
        super().__init__(manager, **kwargs)
        self._guard = guard
        self._due = 0.0
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._due = self._loop.time() + self._guard.read_timeout
        self._guard.admit(self)
        self._deadline = self._loop.call_at(self._due, self._expire)
        super().connection_made(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
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

    async def start(self, app: web.Application, host: str, port: int) -> tuple[str, int]:
        """Listen; returns the bound address (for port 0). On failure nothing is left open."""
        loop = asyncio.get_running_loop()
        self.app = app
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await self._runner.setup()
        manager = self._runner.server
        guard = self.guard

        def factory() -> Handler:
            return Handler(manager, guard, loop=loop, access_log=None, keepalive_timeout=guard.read_timeout,
                           lingering_time=0, max_line_size=MAX_LINE, max_field_size=MAX_FIELD,
                           max_headers=MAX_HEADERS)

        protocol: Any = factory
        if self.fast_health:  # probes answered from precomputed bytes; anything else goes on to aiohttp
            self._fast = FastHealth(self.state, factory, guard)
            protocol = self._fast.protocol
        try:
            self._server = await loop.create_server(protocol, host, port, backlog=1024, reuse_address=True)
        except BaseException:
            await self.stop()
            raise
        return self._server.sockets[0].getsockname()[:2]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._fast is not None:
            self._fast.close()  # its own connections; aiohttp's runner closes those handed over
            self._fast = None
        if self._runner is not None:
            await self._runner.cleanup()  # closes idle connections, lets in-flight requests finish
            self._runner = None

"""aiohttp's side of the HTTP listener: its request handler under the guard's deadline, and the rate limit
for the requests that reach it. Imported when the first request the fast responder does not answer arrives."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import LineTooLong

from agent import logs
from agent.serving.fasthealth import is_probe
from agent.serving.guard import Guard

# A load balancer's probe is one short line and a handful of headers; anything near these is hostile.
MAX_LINE = 4096  # the request line
MAX_FIELD = 4096  # one header, name and value
MAX_HEADERS = 32


def _too_large(exc: BaseException | None) -> bool:
    # aiohttp reports every oversized head as a 400; the C and Python parsers raise LineTooLong for a
    # long line or header and a BadHttpMessage that says so for too many headers.
    return isinstance(exc, LineTooLong) or "too many headers" in str(exc).lower()


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


def handler_factory(manager: web.Server, guard: Guard) -> Any:
    """The protocol factory for connections under `guard`, served by `manager` (an AppRunner's server)."""
    loop = asyncio.get_running_loop()

    def factory() -> Handler:
        return Handler(manager, guard, loop=loop, access_log=None, keepalive_timeout=guard.read_timeout,
                       lingering_time=0, max_line_size=MAX_LINE, max_field_size=MAX_FIELD,
                       max_headers=MAX_HEADERS)

    return factory

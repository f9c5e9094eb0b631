"""The HTTP listener: the fast responder on the socket, aiohttp's app built on first need for the rest."""

from __future__ import annotations

import asyncio
import errno
import functools
import importlib
import os
import socket
import stat
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from agent.config import ServerConfig
from agent.probes.blocking import off_loop
from agent.serving.fasthealth import FastHealth
from agent.serving.guard import Guard
from agent.state import AgentState

if TYPE_CHECKING:
    from aiohttp import web

RESOLVE_TIMEOUT = 5.0  # a listen address given as a name: how long its lookup may take before start fails
# What serving anything but a probe or a scrape needs: aiohttp (client and server, about 12 MB of an idle
# agent's memory) and the handlers. Imported off the loop's thread when the first such request comes.
WEB_MODULES = ("aiohttp.web", "agent.serving.handler", "agent.serving.http_api")


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
    """The HTTP server of one agent, on a TCP port and on the admin socket.

    The fast responder owns every connection first and answers probes (/health, /ready, /live) and
    scrapes (/metrics) itself. aiohttp, and the app `build_app` makes, serve everything else (/status, the
    status page, /admin, odd requests); until the first such request arrives they are not even imported,
    which is most of an idle agent's memory: a node that only its load balancer probes and Prometheus
    scrapes never loads them. The first request that needs them waits while they load (a fraction of a
    second, in a thread: the loop and the probes go on meanwhile). With fast_health = false aiohttp serves
    every request, and is loaded at start.
    """

    def __init__(self, server: ServerConfig, state: AgentState, build_app: Callable[[], web.Application],
                 metrics: Callable[[], bytes] | None = None):
        self.guard = Guard(server)
        self.state = state
        self.fast_health = server.fast_health
        self._build = build_app
        self._metrics = metrics
        self._fast: FastHealth | None = None
        self.app: web.Application | None = None
        self._runner: web.AppRunner | None = None
        self._loading: asyncio.Task[None] | None = None
        self._slots: dict[str, Any] = {}  # the import's thread (probes.blocking.off_loop)
        self._server: asyncio.Server | None = None
        # The admin socket has a guard of its own: a flood on the TCP port cannot evict an operator.
        self.local_guard = Guard(server)
        self.local_guard.configure(server, rate=0)
        self._local_fast: FastHealth | None = None
        self._local: asyncio.Server | None = None
        self._local_path: str | None = None
        self._local_id: tuple[int, int] | None = None

    @property
    def loaded(self) -> bool:
        """Whether aiohttp's app is built and serving (after the first request that needed it)."""
        return self._runner is not None

    async def load(self) -> None:
        """Import aiohttp and the handlers (in a thread of their own: an import reads and runs a few hundred
        files, and a slow disk must not stall the loop), then build the app and its runner on the loop.
        Concurrent callers share one load; a failed load is tried again by the next caller."""
        if self._runner is not None:
            return
        if self._loading is None:
            self._loading = asyncio.create_task(self._load(), name="http-app-load")
        task = self._loading
        try:
            await asyncio.shield(task)
        finally:
            if task.done() and (task.cancelled() or task.exception() is not None) and self._loading is task:
                self._loading = None

    async def _load(self) -> None:
        await off_loop(self._slots, "import", _import_all, WEB_MODULES, name="healthgate-import")
        from aiohttp import web

        from agent.serving.handler import within_rate

        # `app` from the moment it is built: a reload applies new tokens to it from then on, so one that
        # lands while its runner starts (on_startup may await) is not lost.
        self.app = app = self._build()
        if within_rate not in app.middlewares:
            app.middlewares.insert(0, within_rate)  # first: a refused request costs nothing more
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        try:
            await runner.setup()
        except BaseException:
            self.app = None
            raise
        self._runner = runner
        for fast, guard in ((self._fast, self.guard), (self._local_fast, self.local_guard)):
            if fast is not None:
                fast.fallback = self._handlers(guard)

    def _handlers(self, guard: Guard) -> Callable[[], asyncio.Protocol]:
        """aiohttp's protocol factory for connections under `guard`; once loaded."""
        from agent.serving.handler import handler_factory

        assert self._runner is not None and self._runner.server is not None
        return handler_factory(self._runner.server, guard)

    def _front(self, guard: Guard) -> FastHealth:
        return FastHealth(self.state, guard, self.load, metrics=self._metrics)

    async def start(self, host: str, port: int) -> tuple[str, int]:
        """Listen; returns the bound address (for port 0). On failure nothing is left open."""
        loop = asyncio.get_running_loop()
        try:
            if self.fast_health:
                self._fast = self._front(self.guard)
                protocol: Any = self._fast.protocol
            else:  # aiohttp answers every request from its first byte
                await self.load()
                protocol = self._handlers(self.guard)
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
        self._local_fast = front = self._front(self.local_guard)
        if self._runner is not None:
            front.fallback = self._handlers(self.local_guard)
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
            self._local = await loop.create_unix_server(front.protocol, sock=sock, backlog=64)
        except BaseException:
            sock.close()
            raise
        self._local_path, self._local_id = path, (st.st_dev, st.st_ino)

    async def stop(self) -> None:
        if self._local is not None:
            self._local.close()
            self._local = None
            path = self._local_path
            try:  # only our own file: another agent may have replaced it since
                st = os.stat(path) if path is not None else None
                if st is not None and path is not None and (st.st_dev, st.st_ino) == self._local_id:
                    os.unlink(path)
            except OSError:
                pass
        if self._server is not None:
            self._server.close()
            self._server = None
        for fast in (self._fast, self._local_fast):
            if fast is not None:
                fast.close()  # its own connections; aiohttp's runner closes those handed over
        self._fast = self._local_fast = None
        if self._loading is not None and not self._loading.done():
            self._loading.cancel()
        self._loading = None
        if self._runner is not None:
            await self._runner.cleanup()  # closes idle connections, lets in-flight requests finish
            self._runner = None


def _import_all(names: tuple[str, ...]) -> None:
    for name in names:
        importlib.import_module(name)

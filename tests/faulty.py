"""Tiny real servers that misbehave on demand: they die, hang, answer slowly, answer garbage or flap."""

from __future__ import annotations

import asyncio
import random
import socket
import threading

from aiohttp import web


class TcpDependency:
    """A TCP listener on a fixed loopback port that can be killed and revived, or made to misbehave.

    mode "ok": accepts and closes; "hang": accepts and never answers nor closes; "garbage": writes junk
    and closes; "slow": waits `delay` before answering; an HTTP request gets a real answer in "ok" mode.
    """

    def __init__(self, mode: str = "ok", delay: float = 0.0):
        self.mode = mode
        self.delay = delay
        self.port = 0
        self._server: asyncio.Server | None = None
        self._held: set[asyncio.StreamWriter] = set()

    @property
    def alive(self) -> bool:
        return self._server is not None

    async def start(self) -> TcpDependency:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        self.port = sock.getsockname()[1]
        self._server = await asyncio.start_server(self._serve, sock=sock)
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._held.add(writer)
        try:
            if self.mode == "hang":
                await asyncio.Event().wait()
            if self.mode == "slow":
                await asyncio.sleep(self.delay)
            if self.mode == "garbage":
                writer.write(b"\x00\xffNOT HTTP AT ALL\r\n\r\n\x00")
            else:
                try:
                    await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=0.5)
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
                    pass  # a plain TCP connect: nothing to answer
            await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._held.discard(writer)
            writer.close()

    async def kill(self) -> None:
        """Stop listening and reset every open connection: the dependency died."""
        if self._server is None:
            return
        self._server.close()
        for w in list(self._held):
            w.transport.abort()
        self._held.clear()
        await self._server.wait_closed()
        self._server = None

    async def revive(self) -> None:
        if self._server is None:
            await self.start()


class HttpDependency:
    """An aiohttp server whose /ok answers 200 or 503 as `healthy` says."""

    def __init__(self) -> None:
        self.healthy = True
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> HttpDependency:
        async def ok(request: web.Request) -> web.Response:
            return web.Response(status=200 if self.healthy else 503, text="ok\n" if self.healthy else "no\n")

        app = web.Application()
        app.router.add_get("/ok", ok)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}/ok"
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


class SilentDns:
    """A DNS server that reads every query, over UDP and TCP, and never answers: a hung resolver.

    resolv.conf takes no port, so it listens on port 53 of a loopback address of its own (127.x.y.z,
    picked at random so concurrent test runs don't collide); binding port 53 needs root.
    """

    def __init__(self) -> None:
        self.host = ""
        self.queries = 0  # UDP datagrams and TCP connections received
        self._socks: list[socket.socket] = []
        self._held: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()

    def resolv_conf(self) -> str:
        # Long timeouts: every lookup stays stuck for the whole test, as behind a dead resolver.
        return f"nameserver {self.host}\noptions timeout:30 attempts:1\n"

    def start(self) -> SilentDns:
        for _ in range(50):
            host = "127." + ".".join(str(random.randint(1, 254)) for _ in range(3))
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                udp.bind((host, 53))
                tcp.bind((host, 53))
            except OSError:
                udp.close()
                tcp.close()
                continue
            tcp.listen(64)
            for sock in (udp, tcp):
                sock.settimeout(0.1)  # so the serving threads notice stop()
            self.host, self._socks = host, [udp, tcp]
            break
        else:
            raise RuntimeError("no loopback address with port 53 free for UDP and TCP")
        for target in (self._udp, self._tcp):
            t = threading.Thread(target=target, daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def _udp(self) -> None:
        while not self._stopping.is_set():
            try:
                self._socks[0].recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            self.queries += 1

    def _tcp(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = self._socks[1].accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.queries += 1
            self._held.append(conn)  # read by nobody, answered never, closed at stop()

    def stop(self) -> None:
        self._stopping.set()
        for t in self._threads:
            t.join(2)
        for sock in [*self._socks, *self._held]:
            sock.close()

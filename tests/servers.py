"""Real servers on ephemeral loopback ports for probe tests and benchmarks: each one can be broken on demand.

Every server is a plain object with start()/stop() (usable outside pytest, by bench/); the fixtures at
the bottom own their lifetime. Subprocess servers log to a file in their own directory, shown on failure.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import pwd
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiohttp import web

from tests.helpers import free_port, require, wait_for

PG_USERS = {"scram_user": "scram-sha-256", "md5_user": "md5", "pw_user": "password"}
PG_PASSWORD = "Pg-s3cret:/@ %pass"  # every PostgreSQL test user has it; URL-hostile on purpose


def free_udp_tcp_port(host: str = "127.0.0.1") -> int:
    """A port free for both TCP and UDP (a DNS server listens on both)."""
    for _ in range(50):
        port = free_port(host)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        return port
    raise RuntimeError("no port free for both TCP and UDP")


def _stop_process(proc: subprocess.Popen | None, sig: int = signal.SIGTERM, timeout: float = 10) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


# -- certificates ------------------------------------------------------------------------------------


class Certs:
    """A test CA (trustme) that writes PEM files: valid, expired, expiring-soon and wrong-name leaves."""

    def __init__(self, directory: Path):
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ca = trustme.CA()
        self.ca_file = str(self.dir / "ca.pem")
        self.ca.cert_pem.write_to_path(self.ca_file)
        self._n = 0

    def issue(self, *names: str, days: float = 365, expired: bool = False) -> tuple[str, str]:
        """(cert_file, key_file) for `names`; `expired` makes one that ended yesterday."""
        now = dt.datetime.now(dt.UTC)
        if expired:
            not_before, not_after = now - dt.timedelta(days=30), now - dt.timedelta(days=1)
        else:
            not_before, not_after = now - dt.timedelta(hours=1), now + dt.timedelta(days=days)
        leaf = self.ca.issue_cert(*(names or ("127.0.0.1", "localhost")), not_before=not_before,
                                  not_after=not_after)
        self._n += 1
        cert, key = self.dir / f"leaf{self._n}.pem", self.dir / f"leaf{self._n}.key"
        cert.write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
        leaf.private_key_pem.write_to_path(str(key))
        return str(cert), str(key)

    def server_context(self, cert: tuple[str, str]) -> ssl.SSLContext:
        sslctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        sslctx.load_cert_chain(*cert)
        return sslctx


# -- tiny misbehaving socket servers (threads: independent of any event loop) -------------------------


class _ThreadServer:
    """A listening socket served by one thread; `handle(conn)` decides what the server does."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self.host = host
        self.port = port
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.held: list[socket.socket] = []
        self.accepted = 0

    def start(self) -> _ThreadServer:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        sock.listen(128)
        sock.settimeout(0.05)
        self.port = sock.getsockname()[1]
        self._sock = sock
        self._stop.clear()
        self._thread = threading.Thread(target=self._serve, daemon=True, name=type(self).__name__)
        self._thread.start()
        return self

    def _serve(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            try:
                self.handle(conn)
            except OSError:
                conn.close()

    def handle(self, conn: socket.socket) -> None:
        conn.close()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        for c in self.held:
            c.close()
        self.held.clear()


class Blackhole(_ThreadServer):
    """Accepts connections and never answers: the hung dependency."""

    def handle(self, conn: socket.socket) -> None:
        self.held.append(conn)


class TLSServer(_ThreadServer):
    """Completes TLS handshakes with the certificate in force, then closes. `use()` swaps the certificate."""

    def __init__(self, context: ssl.SSLContext, host: str = "127.0.0.1", port: int = 0):
        super().__init__(host, port)
        self.context = context

    def use(self, context: ssl.SSLContext) -> None:
        self.context = context  # a reference swap: the next handshake uses it

    def handle(self, conn: socket.socket) -> None:
        conn.settimeout(2)
        try:
            with self.context.wrap_socket(conn, server_side=True) as tls:
                tls.recv(1)  # until the client closes
        except (ssl.SSLError, OSError):
            pass
        finally:
            conn.close()


# -- an HTTP server that can be slowed, failed, stopped (aiohttp in its own thread and loop) ------------


class HttpServer:
    """aiohttp on a loopback port. Knobs: `status`, `delay` (seconds), `body`, `redirect_to`; `/redirect`, `/endless`,
    `/auth` (401 unless the Authorization header is one of `auth`) besides `/`. stop() closes the port; start() reopens it."""

    def __init__(self, ssl_context: ssl.SSLContext | None = None, host: str = "127.0.0.1"):
        self.host = host
        self.port = free_port(host)
        self.ssl_context = ssl_context
        self.status = 200
        self.delay = 0.0
        self.body = "ok"
        self.auth: set[str] = set()
        self.seen_headers: list[dict[str, str]] = []
        self.redirect_to = "/"  # where /redirect sends the client: a path, or another server's URL
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="HttpServer")
        self._thread.start()
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        scheme = "https" if self.ssl_context else "http"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}"

    def _app(self) -> web.Application:
        async def root(request: web.Request) -> web.StreamResponse:
            self.seen_headers.append(dict(request.headers))
            if self.delay:
                await asyncio.sleep(self.delay)
            return web.Response(status=self.status, text=self.body)

        async def redirect(request: web.Request) -> web.StreamResponse:
            raise web.HTTPFound(self.redirect_to)

        async def endless(request: web.Request) -> web.StreamResponse:
            resp = web.StreamResponse()
            await resp.prepare(request)
            chunk = b"x" * 65536
            for _ in range(100_000):  # 6 GB if anyone read it all; bounded so the server stops by itself
                await resp.write(chunk)
            return resp

        async def auth(request: web.Request) -> web.StreamResponse:
            if request.headers.get("Authorization") not in self.auth:
                return web.Response(status=401, text="unauthorized")
            return web.Response(text="ok")

        app = web.Application()
        app.router.add_route("*", "/", root)
        app.router.add_get("/redirect", redirect)
        app.router.add_get("/endless", endless)
        app.router.add_get("/auth", auth)
        return app

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    def start(self) -> HttpServer:
        async def up() -> None:
            self._runner = web.AppRunner(self._app(), access_log=None, shutdown_timeout=0.1)
            await self._runner.setup()
            site = web.TCPSite(self._runner, self.host, self.port, ssl_context=self.ssl_context,
                               reuse_address=True)
            await site.start()

        self._call(up())
        return self

    def stop(self) -> None:
        if self._runner is not None:
            self._call(self._runner.cleanup())
            self._runner = None

    def close(self) -> None:
        self.stop()

        async def cancel_rest() -> None:  # handlers still sleeping for a slow answer
            rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in rest:
                t.cancel()
            await asyncio.gather(*rest, return_exceptions=True)

        self._call(cancel_rest())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()


# -- redis-server ---------------------------------------------------------------------------------------


class RedisServer:
    """redis-server on a free loopback port, configured by `options` (redis.conf directives)."""

    def __init__(self, directory: Path, password: str | None = None, tls: Certs | None = None,
                 **options: str):
        self.binary = require("redis-server", "redis-server")
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.password = password
        self.tls = tls
        self.options = options
        self.proc: subprocess.Popen | None = None
        self.log = self.dir / "redis.log"

    def config(self, **extra: str) -> str:
        lines = {"bind": "127.0.0.1", "save": '""', "appendonly": "no", "dir": str(self.dir),
                 "dbfilename": "dump.rdb", "logfile": str(self.log), "enable-debug-command": "yes",
                 "unixsocket": str(self.dir / "redis.sock"), "unixsocketperm": "700",
                 "repl-diskless-sync-delay": "0"}
        if self.tls is not None:
            cert, key = self.tls.issue("127.0.0.1", "localhost")
            lines.update({"port": "0", "tls-port": str(self.port), "tls-cert-file": cert, "tls-key-file": key,
                          "tls-ca-cert-file": self.tls.ca_file, "tls-auth-clients": "no"})
        else:
            lines["port"] = str(self.port)
        if self.password:
            lines["requirepass"] = f'"{self.password}"'
        lines.update(self.options)
        lines.update(extra)
        return "\n".join(f"{k} {v}" for k, v in lines.items()) + "\n"

    def start(self, wait: bool = True, **extra: str) -> RedisServer:
        conf = self.dir / "redis.conf"
        conf.write_text(self.config(**extra))
        self.proc = subprocess.Popen([self.binary, str(conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.STDOUT)
        if wait:
            wait_for(lambda: self.proc.poll() is not None or self.cli("PING").strip() == "PONG", timeout=10,
                     what=f"redis-server on {self.port}")
            assert self.proc.poll() is None, self.log.read_text()
        return self

    def cli(self, *args: str) -> str:
        """redis-cli over the unix socket (works with TLS on and while the TCP side is broken)."""
        cmd = ["redis-cli", "-s", str(self.dir / "redis.sock")]
        if self.password:
            cmd += ["--no-auth-warning", "-a", self.password]
        return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=10).stdout

    def stop(self) -> None:
        _stop_process(self.proc)
        self.proc = None


# -- etcd -------------------------------------------------------------------------------------------------


class EtcdServer:
    """A single-member etcd on free loopback ports; start(fresh=True) comes back with an empty data directory."""

    def __init__(self, directory: Path):
        self.binary = require("etcd", "etcd-server")
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.peer_port = free_port()
        self.proc: subprocess.Popen | None = None
        self.log = self.dir / "etcd.log"

    @property
    def url(self) -> str:
        return f"etcd://127.0.0.1:{self.port}"

    def start(self, fresh: bool = False) -> EtcdServer:
        data = self.dir / "data"
        if fresh:
            shutil.rmtree(data, ignore_errors=True)
        client, peer = f"http://127.0.0.1:{self.port}", f"http://127.0.0.1:{self.peer_port}"
        cmd = [self.binary, "--name", "t", "--data-dir", str(data), "--listen-client-urls", client,
               "--advertise-client-urls", client, "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
               "--initial-cluster", f"t={peer}", "--log-outputs", str(self.log), "--logger", "zap"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        wait_for(lambda: self.proc.poll() is not None or self._healthy(), timeout=20, what=f"etcd on {self.port}")
        assert self.proc.poll() is None, self.log.read_text() if self.log.exists() else "etcd exited"
        return self

    def _healthy(self) -> bool:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=1) as resp:
            return b'"true"' in resp.read()

    def stop(self, sig: int = signal.SIGTERM) -> None:
        _stop_process(self.proc, sig)
        self.proc = None


# -- PostgreSQL -----------------------------------------------------------------------------------------


def _pg_bin(name: str) -> str:
    return require(name, "postgresql")


class PostgresServer:
    """PostgreSQL in its own temporary directory, run as the `postgres` user when started as root.

    TLS is on (a trustme certificate); the users of PG_USERS log in over TCP with PG_PASSWORD through
    the auth method their name says; `postgres` is trusted over the unix socket (for the fixtures).
    """

    def __init__(self, certs: Certs | None = None, base: str | None = None):
        self.root = Path(tempfile.mkdtemp(prefix="healthgate-pg-", dir=base))
        self.data = self.root / "data"
        self.port = free_port()
        self.certs = certs
        self.proc: subprocess.Popen | None = None
        self.log = self.root / "postgres.log"
        self.as_postgres = os.geteuid() == 0
        if self.as_postgres:
            pw = pwd.getpwnam("postgres")
            os.chown(self.root, pw.pw_uid, pw.pw_gid)

    @property
    def socket_dir(self) -> str:
        return str(self.root)

    def _run(self, *cmd: str, **kw: Any) -> subprocess.CompletedProcess:
        user = {"user": "postgres", "group": "postgres", "extra_groups": []} if self.as_postgres else {}
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True, cwd=self.root,
                              **user, **kw)

    def _own(self, path: Path) -> None:
        if self.as_postgres:
            pw = pwd.getpwnam("postgres")
            os.chown(path, pw.pw_uid, pw.pw_gid)

    def init(self) -> PostgresServer:
        self._run(_pg_bin("initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust", "-N",
                  "-E", "UTF8", "--no-instructions")
        conf = ["listen_addresses = '127.0.0.1'", "fsync = off", "full_page_writes = off",
                "synchronous_commit = off", "max_connections = 30", "shared_buffers = 16MB",
                "wal_level = replica", "max_wal_senders = 4", "hot_standby = on", "log_min_messages = warning"]
        if self.certs is not None:
            cert, key = self.certs.issue("127.0.0.1", "localhost")
            for src, dst in ((cert, "server.crt"), (key, "server.key")):
                shutil.copy(src, self.data / dst)
                os.chmod(self.data / dst, 0o600)
                self._own(self.data / dst)
            conf += ["ssl = on", "ssl_cert_file = 'server.crt'", "ssl_key_file = 'server.key'"]
        with open(self.data / "postgresql.conf", "a") as f:
            f.write("\n".join(conf) + "\n")
        hba = ["local all postgres trust", "local replication postgres trust",
               "host replication postgres 127.0.0.1/32 trust"]
        hba += [f"host all {user} 127.0.0.1/32 {method}" for user, method in PG_USERS.items()]
        hba += ["host all all 127.0.0.1/32 scram-sha-256"]
        (self.data / "pg_hba.conf").write_text("\n".join(hba) + "\n")
        return self

    def start(self) -> PostgresServer:
        user = {"user": "postgres", "group": "postgres", "extra_groups": []} if self.as_postgres else {}
        log = open(self.log, "ab")  # noqa: SIM115 - handed to the child
        try:
            self.proc = subprocess.Popen(
                [_pg_bin("postgres"), "-D", str(self.data), "-p", str(self.port), "-k", self.socket_dir],
                stdout=log, stderr=subprocess.STDOUT, **user)
        finally:
            log.close()
        wait_for(lambda: self.proc.poll() is not None or self.ready(), timeout=30, what="postgres accepting")
        assert self.proc.poll() is None, self.log.read_text()
        return self

    def ready(self) -> bool:
        r = subprocess.run([_pg_bin("pg_isready"), "-q", "-h", self.socket_dir, "-p", str(self.port)],
                           capture_output=True, timeout=10)
        return r.returncode == 0

    def sql(self, query: str) -> str:
        """Run SQL as the superuser over the unix socket; the result as psql's unaligned text."""
        r = subprocess.run([_pg_bin("psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h",
                            self.socket_dir, "-p", str(self.port), "-U", "postgres", "-d", "postgres", "-c", query],
                           capture_output=True, text=True, timeout=30)
        if r.returncode:
            raise RuntimeError(f"psql: {r.stderr.strip()}")
        return r.stdout.strip()

    def create_users(self) -> None:
        for user, method in PG_USERS.items():
            encryption = "md5" if method == "md5" else "scram-sha-256"
            self.sql(f"SET password_encryption = '{encryption}'; "
                     f"CREATE ROLE {user} LOGIN PASSWORD '{PG_PASSWORD}'")

    def standby(self, port: int | None = None) -> PostgresServer:
        """A streaming standby of this server (pg_basebackup -R), started; on `port` if given."""
        replica = PostgresServer(self.certs, base=str(self.root.parent))
        replica.port = port or replica.port
        self._run(_pg_bin("pg_basebackup"), "-h", self.socket_dir, "-p", str(self.port), "-U", "postgres",
                  "-D", str(replica.data), "-R", "-X", "stream", "-c", "fast", "-N")
        return replica.start()

    def stop(self) -> None:
        _stop_process(self.proc, signal.SIGINT, timeout=20)  # SIGINT: fast shutdown, clients disconnected
        self.proc = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


# -- dnsmasq --------------------------------------------------------------------------------------------


class DnsServer:
    """dnsmasq answering from its own hosts file for names under `.test`; set_hosts() rewrites and reloads it."""

    def __init__(self, directory: Path, hosts: str):
        self.binary = require("dnsmasq", "dnsmasq")
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.hosts = self.dir / "hosts"
        self.hosts.write_text(hosts)
        self.port = free_udp_tcp_port()
        self.log = self.dir / "dnsmasq.log"
        self.proc: subprocess.Popen | None = None

    @property
    def server(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> DnsServer:
        cmd = [self.binary, "--keep-in-foreground", "--conf-file=/dev/null", f"--port={self.port}",
               "--listen-address=127.0.0.1", "--bind-interfaces", "--no-resolv", "--no-hosts",
               f"--addn-hosts={self.hosts}", "--local=/test/", "--pid-file", f"--log-facility={self.log}"]
        if os.geteuid() == 0:
            cmd.append("--user=root")  # stay able to re-read the hosts file, which lives in a private tmp dir
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        wait_for(lambda: self.proc.poll() is not None or self._answers(), timeout=10, what="dnsmasq")
        assert self.proc.poll() is None, self.log.read_text() if self.log.exists() else "dnsmasq exited"
        return self

    def _answers(self) -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.2)
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def set_hosts(self, hosts: str) -> None:
        self.hosts.write_text(hosts)
        assert self.proc is not None
        self.proc.send_signal(signal.SIGHUP)  # dnsmasq re-reads its hosts files and clears its cache

    def stop(self) -> None:
        _stop_process(self.proc)
        self.proc = None


# -- fixtures -------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    """One test CA for the session."""
    return Certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def blackhole_server() -> Iterator[Blackhole]:
    server = Blackhole().start()
    yield server
    server.stop()


@pytest.fixture
def http_server() -> Iterator[HttpServer]:
    server = HttpServer().start()
    yield server
    server.close()


@pytest.fixture
def redis_factory(tmp_path: Path) -> Iterator[Any]:
    """Start redis-server instances: factory(password=..., tls=certs, **redis.conf options)."""
    started: list[RedisServer] = []

    def start(name: str = "redis", **kw: Any) -> RedisServer:
        server = RedisServer(tmp_path / f"{name}{len(started)}", **kw)
        started.append(server)
        return server.start()

    yield start
    for s in started:
        s.stop()


@pytest.fixture
def etcd_factory(tmp_path: Path) -> Iterator[Any]:
    """Start single-member etcd servers: factory(); each on its own ports and data directory."""
    started: list[EtcdServer] = []

    def start(name: str = "etcd") -> EtcdServer:
        server = EtcdServer(tmp_path / f"{name}{len(started)}")
        started.append(server)
        return server.start()

    yield start
    for s in started:
        s.stop()


@pytest.fixture(scope="session")
def postgres_server(certs: Certs) -> Iterator[PostgresServer]:
    """One PostgreSQL primary for the session, with TLS and a user per password auth method."""
    server = PostgresServer(certs).init().start()
    server.create_users()
    yield server
    server.cleanup()


@pytest.fixture
def postgres_standby(postgres_server: PostgresServer) -> Iterator[PostgresServer]:
    """A streaming standby of the session's primary, for this test alone."""
    server = postgres_server.standby()
    yield server
    server.cleanup()


@pytest.fixture
def dns_server(tmp_path: Path) -> Iterator[DnsServer]:
    hosts = "127.0.0.2 app.test\n127.0.0.3 app.test\n::2 app.test\n127.0.0.4 v4only.test\n"
    server = DnsServer(tmp_path / "dns", hosts).start()
    yield server
    server.stop()

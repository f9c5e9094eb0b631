"""Real servers for the benchmarks, each on a free loopback port in a temporary directory, owned by a Proc."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PG_BIN = Path("/usr/lib/postgresql/15/bin")


class BenchError(RuntimeError):
    """A server could not be started or a tool is missing: the run stops with this message."""


def which(binary: str, package: str) -> str:
    path = shutil.which(binary) or next(
        (str(p) for p in (Path("/usr/sbin") / binary, PG_BIN / binary) if p.exists()), None)
    if not path:
        raise BenchError(f"{binary} not found: apt-get install {package}")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(pred: Callable[[], object], timeout: float, what: str, proc: Proc | None = None) -> object:
    """Poll until `pred` is truthy; raise BenchError (with the process log) at the deadline or if it died."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if proc is not None and proc.popen.poll() is not None:
            raise BenchError(f"{proc.name} exited with {proc.popen.returncode} while waiting for {what}:\n"
                             + proc.tail())
        try:
            last = pred()
        except Exception as e:  # not listening yet
            last = e
        if last and not isinstance(last, Exception):
            return last
        time.sleep(0.05)
    raise BenchError(f"timed out after {timeout}s waiting for {what} (last: {last!r})"
                     + (f"\n{proc.tail()}" if proc else ""))


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def http_status(url: str, timeout: float = 2.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code


def http_text(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.read().decode()


def as_postgres() -> list[str]:
    """PostgreSQL refuses to run as root: run its programs as the `postgres` user when we are root."""
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


class Proc:
    """A server subprocess with its log; stop() ends it (TERM, then KILL) and never leaves it running."""

    def __init__(self, name: str, argv: list[str], workdir: Path, port: int, env: dict[str, str] | None = None,
                 cwd: Path | None = None, stop_signal: int = signal.SIGTERM):
        self.name, self.port, self.workdir, self.stop_signal = name, port, workdir, stop_signal
        self.log_path = workdir / f"{name}.log"
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, cwd=cwd or workdir,
                                      env={**os.environ, **(env or {})}, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, sig: int | None = None, timeout: float = 10.0) -> None:
        """Signal the whole process group (a server's workers, runuser's child), wait, then KILL."""
        if self.popen.poll() is None:
            self._killpg(sig or self.stop_signal)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self._killpg(signal.SIGKILL)
                self.popen.wait(5)
        self._log.close()

    def _killpg(self, sig: int) -> None:
        try:
            os.killpg(self.popen.pid, sig)
        except ProcessLookupError:
            pass


class Servers:
    """Every server of one benchmark run, in one temporary directory; close() stops them all."""

    def __init__(self, keep: bool = False):
        self.dir = Path(tempfile.mkdtemp(prefix="healthgate-bench-"))
        os.chmod(self.dir, 0o755)  # the postgres user must reach its data directory inside
        self.keep = keep
        self.procs: list[Proc] = []

    def __enter__(self) -> Servers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for p in reversed(self.procs):
            p.stop()
        self.procs.clear()
        if not self.keep:
            shutil.rmtree(self.dir, ignore_errors=True)

    def stop(self, proc: Proc, sig: int | None = None) -> None:
        proc.stop(sig)
        if proc in self.procs:
            self.procs.remove(proc)

    def _spawn(self, name: str, argv: list[str], port: int, ready: Callable[[], object], timeout: float = 30.0,
               **kw) -> Proc:
        proc = Proc(name, argv, self.dir, port, **kw)
        self.procs.append(proc)
        wait_until(ready, timeout, f"{name} on port {port}", proc)
        return proc

    # -- the servers -------------------------------------------------------------------------------

    def nginx(self, workers: int = 1) -> Proc:
        """nginx answering `return 200` on every path: the practical ceiling for a static answer."""
        port = free_port()
        prefix = self.dir / f"nginx-{port}"
        (prefix / "logs").mkdir(parents=True)
        conf = prefix / "nginx.conf"
        conf.write_text(f"""
worker_processes {workers};
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/logs/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {prefix}/body;
  proxy_temp_path {prefix}/proxy;
  fastcgi_temp_path {prefix}/fastcgi;
  uwsgi_temp_path {prefix}/uwsgi;
  scgi_temp_path {prefix}/scgi;
  keepalive_requests 1000000;
  server {{
    listen 127.0.0.1:{port};
    location / {{ default_type text/plain; return 200 "up\\n"; }}
  }}
}}
""")
        argv = [which("nginx", "nginx"), "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "logs/error.log")]
        return self._spawn("nginx", argv, port, lambda: http_status(f"http://127.0.0.1:{port}/health") == 200)

    def redis(self, port: int | None = None, wait: bool = True) -> Proc:
        """redis-server without persistence; `wait=False` returns at once (the caller times readiness)."""
        port = port or free_port()
        argv = [which("redis-server", "redis-server"), "--port", str(port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no", "--dir", str(self.dir)]
        if not wait:
            proc = Proc(f"redis-{port}", argv, self.dir, port)
            self.procs.append(proc)
            return proc
        return self._spawn(f"redis-{port}", argv, port, lambda: port_open(port))

    def etcd(self) -> Proc:
        """A single-member etcd (Debian's etcd-server) with its data in the run's directory."""
        port, peer = free_port(), free_port()
        client, peer_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{peer}"
        argv = [which("etcd", "etcd-server"), "--name", "bench", "--data-dir", str(self.dir / f"etcd-{port}"),
                "--listen-client-urls", client, "--advertise-client-urls", client, "--listen-peer-urls", peer_url,
                "--initial-advertise-peer-urls", peer_url, "--initial-cluster", f"bench={peer_url}"]
        return self._spawn(f"etcd-{port}", argv, port, lambda: '"true"' in http_text(f"{client}/health", timeout=1))

    def postgres(self) -> Proc:
        """PostgreSQL 15 with pg_stat_statements, trusting loopback, as the postgres user."""
        port = free_port()
        data = self.dir / f"pg-{port}"
        data.mkdir()
        if os.geteuid() == 0:
            shutil.chown(data, "postgres", "postgres")
        initdb = subprocess.run([*as_postgres(), str(PG_BIN / "initdb"), "-D", str(data), "-A", "trust", "-U",
                                 "postgres", "--no-sync", "-E", "UTF8"], capture_output=True, text=True,
                                timeout=120)
        if initdb.returncode:
            raise BenchError(f"initdb failed: {initdb.stderr[-2000:]}")
        argv = [*as_postgres(), str(PG_BIN / "postgres"), "-D", str(data), "-p", str(port),
                "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={data}",
                "-c", "shared_preload_libraries=pg_stat_statements", "-c", "pg_stat_statements.track=all",
                "-c", "fsync=off", "-c", "max_connections=200"]
        # SIGINT is PostgreSQL's fast shutdown (SIGTERM would wait for clients to leave).
        return self._spawn(f"postgres-{port}", argv, port, lambda: port_open(port), timeout=60,
                           stop_signal=signal.SIGINT)

    def healthgate(self, config: str, loop: str = "auto", name: str = "healthgate") -> Proc:
        """`healthgate run` with `config` (a TOML text; {port} is filled in), up once /live answers."""
        port = free_port()
        path = self.dir / f"{name}-{port}.toml"
        path.write_text(config.replace("{port}", str(port)))
        argv = [sys.executable, "-m", "agent", "run", "--loop", loop, "-c", str(path)]
        return self._spawn(name, argv, port, lambda: http_status(f"http://127.0.0.1:{port}/live") == 200,
                           cwd=ROOT, env={"PYTHONUNBUFFERED": "1"})

    def bare(self, period: float = 0.1, name: str = "bare") -> Proc:
        """bench/bare.py: an asyncio process doing nothing but waking every `period` seconds."""
        argv = [sys.executable, "-m", "bench.bare", str(period)]
        return self._spawn(name, argv, 0, lambda: True, cwd=ROOT)

    def naive(self, redis_port: int, pg_port: int, loop: str = "auto") -> Proc:
        """bench/naive.py: an aiohttp /health that pings Redis and PostgreSQL on every request."""
        port = free_port()
        argv = [sys.executable, "-m", "bench.naive", "--port", str(port), "--redis-port", str(redis_port),
                "--pg-port", str(pg_port), "--loop", loop]
        return self._spawn("naive", argv, port, lambda: http_status(f"http://127.0.0.1:{port}/health") == 200,
                           cwd=ROOT)

    def node_exporter(self) -> Proc:
        port = free_port()
        argv = [which("prometheus-node-exporter", "prometheus-node-exporter"),
                f"--web.listen-address=127.0.0.1:{port}"]
        return self._spawn("node-exporter", argv, port, lambda: port_open(port))

"""Test helpers: free ports, polling with a deadline, required binaries, a subprocess agent."""

from __future__ import annotations

import asyncio
import importlib.util
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
REQUIRE_E2E = os.environ.get("HEALTHGATE_REQUIRE_E2E") == "1"
# The event loop of this run (the Makefile's HEALTHGATE_LOOP): auto, asyncio or uvloop. Every agent a test
# starts gets it as --loop; conftest.py runs the in-process tests on the loop it stands for.
LOOP = os.environ.get("HEALTHGATE_LOOP", "auto")


def run_argv(config: Path | str, loop: str = LOOP) -> list[str]:
    """The command line of `healthgate run` with `config`, on this run's loop unless told otherwise."""
    return [sys.executable, "-m", "agent", "run", "--loop", loop, "-c", str(config)]


def loop_in_use(choice: str = LOOP) -> str:
    """The loop `--loop choice` makes the agent run on: asyncio or uvloop."""
    if choice not in ("auto", "asyncio", "uvloop"):
        raise pytest.UsageError(f"HEALTHGATE_LOOP={choice}: expected auto, asyncio or uvloop")
    if choice != "auto":
        return choice
    return "uvloop" if importlib.util.find_spec("uvloop") is not None else "asyncio"


# Ports for programs a test starts that must bind a port themselves (an agent, redis-server, etcd, nginx...).
# Taken below the kernel's ephemeral range (net.ipv4.ip_local_port_range, 32768-60999 by default), so that no
# connection the run makes in the meantime is given the port as its local end before the program binds it (a
# port the kernel chose by binding port 0 is one it may hand out again); one after the other within the run,
# from a start its pid sets (a run beside it, such as the soak, starts elsewhere); and only one nothing holds.
PORTS = range(20000, 32768)
_first_port = PORTS.start + (os.getpid() * 7919) % len(PORTS)
_ports = itertools.cycle([*range(_first_port, PORTS.stop), *range(PORTS.start, _first_port)])
_port_lock = threading.Lock()


def free_port(host: str = "127.0.0.1") -> int:
    """A port on `host` that nothing holds, that this run hands out once, and that the kernel never hands out."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with _port_lock:
        for _ in range(len(PORTS)):
            port = next(_ports)
            with socket.socket(family, socket.SOCK_STREAM) as s:
                try:
                    s.bind((host, port))
                except OSError:
                    continue
            return port
    raise RuntimeError(f"no free port on {host} in {PORTS.start}-{PORTS.stop - 1}")


def require(binary: str, package: str) -> str:
    """The binary's path; skipped (with the Debian package to install) outside CI, a failure in CI."""
    path = shutil.which(binary) or next(
        (str(p) for p in (Path("/usr/sbin") / binary, Path("/usr/lib/postgresql/15/bin") / binary) if p.exists()),
        None,
    )
    if path:
        return path
    msg = f"{binary} not found: apt-get install {package}"
    if REQUIRE_E2E:
        pytest.fail(msg + " (HEALTHGATE_REQUIRE_E2E=1)")
    pytest.skip(msg)


def wait_for(pred: Callable[[], object], timeout: float = 10.0, interval: float = 0.02, what: str = "") -> object:
    """Poll `pred` until it returns something truthy; fail the test at the deadline."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            last = pred()
        except Exception as e:  # a not-yet-listening server raises; keep polling
            last = e
        if last and not isinstance(last, Exception):
            return last
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout}s waiting for {what or pred}: last={last!r}")


async def async_wait_for(pred: Callable[[], Awaitable[object]], timeout: float = 10.0, interval: float = 0.02,
                         what: str = "") -> object:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            last = await pred()
        except Exception as e:
            last = e
        if last and not isinstance(last, Exception):
            return last
        await asyncio.sleep(interval)
    pytest.fail(f"timed out after {timeout}s waiting for {what or pred}: last={last!r}")


def http_get(url: str, timeout: float = 2.0, headers: dict[str, str] | None = None) -> tuple[int, str]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


class AgentProcess:
    """`healthgate run` as a real subprocess on a free loopback port."""

    def __init__(self, tmp: Path, config: str, port: int | None = None, extra_env: dict[str, str] | None = None,
                 wrapper: tuple[str, ...] = (), loop: str = LOOP):
        self.wrapper = wrapper  # a command prefix, e.g. setpriv dropping capabilities
        self.loop = loop
        self.port = port or free_port()
        self.path = tmp / "healthgate.toml"
        self.path.write_text(config.replace("{port}", str(self.port)))
        self.log = tmp / "agent.log"
        # The default state directory follows XDG_STATE_HOME: keep it inside the test's own directory.
        inherited = {k: v for k, v in os.environ.items() if k != "STATE_DIRECTORY"}
        self.env = {**inherited, "PYTHONUNBUFFERED": "1", "XDG_STATE_HOME": str(tmp / "xdg-state"),
                    **(extra_env or {})}
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, wait: bool = True) -> AgentProcess:
        self._log = open(self.log, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([*self.wrapper, *run_argv(self.path, self.loop)],
                                     cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT, env=self.env)
        if wait:
            wait_for(lambda: self.get("/live")[0] == 200 or self.proc.poll() is not None, what="agent /live")
            assert self.proc.poll() is None, self.log.read_text()
        return self

    def get(self, path: str, **kw) -> tuple[int, str]:
        return http_get(self.url + path, **kw)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def logs(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(5)
        if getattr(self, "_log", None):
            self._log.close()


class Dependency:
    """A TCP server a check depends on: accepts and closes every connection until `close()`; `start()`
    listens again on the same port (a dependency that comes back)."""

    def __init__(self) -> None:
        self.port = 0
        self.sock: socket.socket | None = None
        self.start()

    def start(self) -> None:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(256)
        self.sock, self.port = sock, sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, args=(sock,), daemon=True)
        self.thread.start()

    @staticmethod
    def _serve(sock: socket.socket) -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            conn.close()

    def close(self) -> None:
        if self.sock is not None:
            self.sock.shutdown(socket.SHUT_RDWR)
            self.sock.close()
            self.sock = None
            self.thread.join(2)


def scrape(url: str, timeout: float = 2.0) -> dict[str, float]:
    """An agent's /metrics as {series: value}, e.g. {'healthgate_up': 1.0, 'x_total{to="up"}': 3.0}."""
    text = http_get(url.rstrip("/") + "/metrics", timeout=timeout)[1]
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, _, value = line.rpartition(" ")
            out[series] = float(value)
    return out


def process_stats(pid: int) -> dict[str, int]:
    """Resident memory (bytes) and open file descriptors of a process, from /proc."""
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) * 1024
    return {"rss": rss, "fds": len(os.listdir(f"/proc/{pid}/fd"))}


def toml_table(header: str, **keys: object) -> str:
    """A TOML table from keyword arguments: toml_table("[[checks]]", name="db", port=5432, critical=False)."""
    def value(v: object) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        return json.dumps(v) if isinstance(v, str) else str(v)

    return "\n" + "\n".join([header, *(f"{k} = {value(v)}" for k, v in keys.items())]) + "\n"


def agent_toml(server: dict | None = None, policy: dict | None = None, **agent: object) -> str:
    """[server] on 127.0.0.1:{port} without a drain, trusting loopback clients with details (a test that
    needs them untrusted passes trusted_networks=[]), [agent] allowed to run as root (tests do), [policy]."""
    server = {"trusted_networks": ["127.0.0.1/32"], **(server or {})}
    text = toml_table("[server]", listen="127.0.0.1:{port}", shutdown_drain="0s", **server)
    text += toml_table("[agent]", allow_root=True, **agent)
    return text + (toml_table("[policy]", **policy) if policy else "")


PASSING = {"name": "mem", "type": "memory", "interval": "200ms", "timeout": "100ms", "rise": 1,
           "max_used_percent": 100}
"""A critical check that always passes: a config must have one, and tests about something else need it."""


def memory_check(name: str = "mem", **keys: object) -> str:
    """A memory check that always passes, sampled every 200 ms unless told otherwise."""
    return toml_table("[[checks]]", **{**PASSING, "name": name, **keys})


def answer_for(up: bool = True, reason: str = "", admin=None, admin_reason: str = "", fresh: bool = True,
               stopping: bool = False, loop_ok: bool = True, drain_status: int = 503):
    """agent.serving.decision's answer for a snapshot whose checks verdict is `up` (with `reason`), as a table row."""
    from agent.model import Admin, Snapshot, Verdict
    from agent.serving.decision import Condition, decide

    snap = Snapshot(verdict=Verdict(up, reason), admin=admin or Admin.READY, admin_reason=admin_reason, checks=(),
                    computed_at=0.0, since=0.0, since_wall=0.0, loop_lag=0.0)
    cond = Condition(heartbeat=0.0, loop_ok_at=0.0 if loop_ok else 5.0, loop_reason="event loop lag 900 ms > 500 ms",
                     stopping=stopping, max_age=0.5, drain_status=drain_status)
    return decide(snap, cond, 0.1 if fresh else 10.0)

"""The systemd unit (verify, security exposure) and sd_notify against a real unix datagram socket."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from agent.config import load_config
from agent.serving.sdnotify import Notifier, socket_address, watchdog_interval
from tests.helpers import ROOT, require, wait_for

UNIT = ROOT / "deploy" / "systemd" / "healthgate.service"
INSTALLED = "/opt/healthgate/bin/healthgate"


def unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def seconds(value: str) -> float:
    m = re.fullmatch(r"(\d+)(ms|s|min)?", value)
    assert m, value
    return int(m[1]) * {"ms": 0.001, "s": 1, "min": 60, None: 1}[m[2]]


def test_unit_verifies(tmp_path: Path) -> None:
    """`systemd-analyze verify` accepts the unit without a warning (ExecStart pointed at this install's binary)."""
    analyze = require("systemd-analyze", "systemd")
    text = UNIT.read_text()
    assert f"ExecStart={INSTALLED} run" in text
    # verify insists that ExecStart exists: the unit names the documented install path, the copy this one.
    binary = Path(sys.executable).parent / "healthgate"
    assert binary.exists(), binary
    copy = tmp_path / "healthgate.service"
    copy.write_text(text.replace(INSTALLED, str(binary)))
    proc = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout + proc.stderr == "", "unknown or misspelt settings are only warned about: " + proc.stderr


def test_unit_security_exposure_at_most_2() -> None:
    """`systemd-analyze security --offline=true` rates the unit's exposure 2.0 or less."""
    analyze = require("systemd-analyze", "systemd")
    proc = subprocess.run([analyze, "security", "--offline=true", "--no-pager", str(UNIT)], capture_output=True,
                          text=True, timeout=30)
    m = re.search(r"Overall exposure level for healthgate\.service: (\d+\.\d+)", proc.stdout)
    assert m, proc.stdout + proc.stderr
    assert float(m[1]) <= 2.0, proc.stdout


def test_unit_contract() -> None:
    """The unit is Type=notify with a watchdog, reloads with SIGHUP, runs as a dynamic user with a state
    directory, lets every check type work, and gives the shutdown drain time to finish before systemd
    kills the agent."""
    s = unit_settings()
    assert s["Type"] == ["notify"] and s["NotifyAccess"] == ["main"]
    assert s["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert s["DynamicUser"] == ["yes"] and s["StateDirectory"] == ["healthgate"]
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "PrivateDevices"):
        assert s[key] == ["yes"], key
    assert s["ProtectSystem"] == ["strict"] and s["CapabilityBoundingSet"] == [""]
    assert s["SystemCallFilter"][0] == "@system-service" and "MemoryMax" in s
    # listen_queue reads NETLINK_SOCK_DIAG; process and fds checks must see other users' processes.
    assert "AF_NETLINK" in s["RestrictAddressFamilies"][0].split() and s["ProtectProc"] == ["default"]
    drain = load_config(ROOT / "config" / "healthgate.toml").server.shutdown_drain
    assert seconds(s["TimeoutStopSec"][0]) >= drain + 2
    policy = load_config(ROOT / "config" / "healthgate.toml").policy
    # A ping every WatchdogSec/2, delayed at most by loop_recovery after a lag spike.
    assert seconds(s["WatchdogSec"][0]) / 2 > policy.loop_recovery + policy.max_loop_lag


class Listener:
    """A unix datagram socket standing in for systemd: records (monotonic time, fields) as they arrive."""

    def __init__(self, address: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(socket_address(address))
        self.sock.settimeout(0.05)
        self.got: list[tuple[float, list[str]]] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._done.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            self.got.append((time.monotonic(), data.decode().split("\n")))

    def first(self, field: str) -> tuple[float, list[str]] | None:
        return next(((t, f) for t, f in list(self.got) if field in f), None)

    def times(self, field: str) -> list[float]:
        return [t for t, f in list(self.got) if field in f]

    def close(self) -> None:
        self._done.set()
        self._thread.join(2)
        self.sock.close()


@pytest.fixture
def notify_socket():
    listeners: list[Listener] = []

    def make(address: str) -> Listener:
        listeners.append(Listener(address))
        return listeners[-1]

    yield make
    for listener in listeners:
        listener.close()


AGENT = """
[server]
listen = "127.0.0.1:{port}"
shutdown_drain = "300ms"
trusted_networks = ["127.0.0.1/32"]
[agent]
allow_root = true
[policy]
loop_recovery = "1s"
[[checks]]
name = "web"
type = "http"
url = "http://127.0.0.1:%d/"
interval = "1s"
timeout = "800ms"
fall = 1
"""


def test_sd_notify_ready_watchdog_stopping(agent_process, notify_socket) -> None:
    """Under NOTIFY_SOCKET the agent sends READY=1 only once the first verdict exists, WATCHDOG=1 at half
    WATCHDOG_USEC while its loop is healthy (none while stopped, and none for loop_recovery after a stall),
    and STOPPING=1 when SIGTERM starts the drain."""
    address = f"@healthgate-test-{os.getpid()}-{time.monotonic_ns()}"
    listener = notify_socket(address)
    # An HTTP dependency that accepts and never answers: the first verdict takes the check's timeout.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)  # never accepted: each sample waits in the backlog until its timeout
    try:
        agent = agent_process(AGENT % silent.getsockname()[1],
                              extra_env={"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "3400000"})
        ready = wait_for(lambda: listener.first("READY=1"), timeout=10, what="READY=1")
        status = [f for f in ready[1] if f.startswith("STATUS=")]
        assert status == ["STATUS=down: web: timeout after 800 ms"], ready
        # READY=1 was sent after the first result, never before it.
        entries = [e for v in json.loads(agent.get("/status")[1])["checks"].values() for e in v]
        assert all("time" in e for e in entries), entries
        wait_for(lambda: len(listener.times("WATCHDOG=1")) >= 3, timeout=8, what="watchdog pings")
        pings = listener.times("WATCHDOG=1")
        gaps = sorted(b - a for a, b in zip(pings, pings[1:], strict=False))
        # every 1.7 s (half of WATCHDOG_USEC, which must outlast loop_recovery + max_loop_lag), on heartbeats
        assert 1.6 <= gaps[len(gaps) // 2] <= 2.0, gaps

        agent.signal(signal.SIGSTOP)
        stopped = time.monotonic()
        time.sleep(1.0)  # the stall itself, not a synchronisation
        agent.signal(signal.SIGCONT)
        resumed = time.monotonic()
        wait_for(lambda: any(t > resumed for t in listener.times("WATCHDOG=1")), timeout=5,
                 what="pings resume after loop_recovery")
        # (a margin for pings sent just before SIGSTOP and read late by this busy test process)
        assert not [t for t in listener.times("WATCHDOG=1") if stopped + 0.5 < t < resumed]
        first_after = min(t for t in listener.times("WATCHDOG=1") if t > resumed)
        assert first_after - resumed >= 0.8, "a stalled loop must not ping until it has recovered"

        agent.signal(signal.SIGTERM)
        assert agent.proc.wait(10) == 0
        stopping = wait_for(lambda: listener.first("STOPPING=1"), timeout=2, what="STOPPING=1")
        assert "STATUS=draining for 0.3s, serving down" in stopping[1]
        assert len([f for _, f in listener.got if "READY=1" in f]) == 1
    finally:
        silent.close()


def test_notifier_on_a_path_socket_and_watchdog_pid(tmp_path: Path, notify_socket) -> None:
    """A filesystem NOTIFY_SOCKET works; WATCHDOG_PID naming another process turns the watchdog off; the
    variables are removed so a check's subprocess cannot speak for the agent."""
    path = str(tmp_path / "notify")
    assert len(path) < 100, "AF_UNIX paths are limited to 107 bytes"
    listener = notify_socket(path)
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1", "OTHER": "x"}
    notifier = Notifier.from_env(env)
    assert notifier.enabled and notifier.watchdog is None
    assert env == {"OTHER": "x"}
    assert notifier.send("READY=1", "STATUS=up")
    wait_for(lambda: listener.first("READY=1"), timeout=2, what="datagram")
    assert listener.got[0][1] == ["READY=1", "STATUS=up"]
    notifier.close()


@pytest.mark.parametrize(("env", "expected"), [
    ({}, None),
    ({"WATCHDOG_USEC": "10000000"}, 5.0),
    ({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": str(os.getpid())}, 5.0),
    ({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "1"}, None),
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "soon"}, None),
])
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    """Pings go at half WATCHDOG_USEC, and only to the process WATCHDOG_PID names."""
    assert watchdog_interval(env) == expected


@pytest.mark.parametrize(("value", "address"), [
    ("/run/systemd/notify", "/run/systemd/notify"),
    ("@abstract", "\0abstract"),
    ("relative/path", None),
    ("vsock:2:1234", None),
    ("", None),
    (None, None),
])
def test_socket_address(value: str | None, address: str | None) -> None:
    """An absolute path or an '@' abstract name; anything else means: not under a service manager."""
    assert socket_address(value) == address


def test_no_notify_socket_is_a_quiet_no_op() -> None:
    """Without NOTIFY_SOCKET nothing is sent and nothing fails."""
    notifier = Notifier.from_env({})
    assert not notifier.enabled and not notifier.send("READY=1")


def test_vanished_socket_never_raises(tmp_path: Path) -> None:
    """A notify socket that disappeared drops the message instead of raising into the heartbeat."""
    notifier = Notifier(str(tmp_path / "gone"), watchdog=1.0)
    assert notifier.send("WATCHDOG=1") is False
    assert notifier.send("WATCHDOG=1") is False
    notifier.close()


def test_a_watchdog_shorter_than_a_stall_recovery_is_refused(tmp_path: Path) -> None:
    """Under a service-manager watchdog that a stall's loop_recovery would outlast (no WATCHDOG=1 while the
    loop recovers), `run` refuses to start, exit 2, naming policy.loop_recovery: a short stall must not get a
    healthy agent killed."""
    import subprocess
    import sys

    from tests.helpers import ROOT, free_port

    path = tmp_path / "healthgate.toml"
    path.write_text(AGENT.replace("{port}", str(free_port())) % 1)
    env = {**os.environ, "NOTIFY_SOCKET": "@healthgate-refused", "WATCHDOG_USEC": "2000000",
           "XDG_STATE_HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "agent", "run", "-c", str(path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "policy.loop_recovery: the service manager's watchdog" in proc.stderr, proc.stderr

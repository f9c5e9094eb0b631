"""A hostile review of the serving decision: stalls at the edge of max_loop_lag, agent-send, ?exclude=."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT, agent_toml, free_port, http_get, memory_check, wait_for

LAG = 0.4


def _stopped(pid: int) -> bool:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"


def _start(tmp: Path, config: str, loop: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    path = tmp / "healthgate.toml"
    path.write_text(config.replace("{port}", str(port)))
    env = {**{k: v for k, v in os.environ.items() if k != "STATE_DIRECTORY"}, "XDG_STATE_HOME": str(tmp / "xdg")}
    proc = subprocess.Popen([sys.executable, "-m", "agent", "run", "--loop", loop, "-c", str(path)], cwd=ROOT,
                            stdout=open(tmp / "agent.log", "ab"), stderr=subprocess.STDOUT, env=env)  # noqa: SIM115
    return proc, port


def _loops() -> list[str]:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return ["asyncio"]
    return ["asyncio", "uvloop"]


def _pause(proc: subprocess.Popen, port: int, stall: float) -> bytes:
    """SIGSTOP the agent, send /health on a fresh connection while it is stopped, hold the stop for
    `stall` seconds (the fault itself), SIGCONT; the status line of the answer."""
    proc.send_signal(signal.SIGSTOP)
    try:
        wait_for(lambda: _stopped(proc.pid), timeout=5, interval=0.001, what="stopped")
        t0 = time.monotonic()
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        while time.monotonic() - t0 < stall:  # hold the deliberate fault
            time.sleep(0.002)
    finally:
        proc.send_signal(signal.SIGCONT)
    with s:
        return s.recv(200).split(b"\r\n", 1)[0]


def _run_stalls(tmp: Path, loop: str, recovery: str, stall: float, rounds: int) -> list[bytes]:
    cfg = agent_toml(policy={"max_loop_lag": f"{LAG * 1000:.0f}ms", "loop_recovery": recovery}) + memory_check(
        interval="100ms", timeout="50ms")
    proc, port = _start(tmp, cfg, loop)
    try:
        got = []
        for _ in range(rounds):
            wait_for(lambda: http_get(f"http://127.0.0.1:{port}/health")[0] == 200, timeout=20, what="up")
            got.append(_pause(proc, port, stall))
        return got
    finally:
        proc.kill()
        proc.wait(5)


@pytest.mark.parametrize("loop", _loops())
def test_a_pause_just_longer_than_max_loop_lag_is_answered_down(tmp_path: Path, loop: str) -> None:
    """A request that waited through a SIGSTOP a little longer than max_loop_lag is answered 503, whatever
    the phase of the heartbeat when the pause began (the heartbeat must count its own period as stalled)."""
    got = _run_stalls(tmp_path, loop, "1s", LAG * 1.03, rounds=6)
    assert all(line.startswith(b"HTTP/1.1 503") for line in got), got


@pytest.mark.parametrize("loop", _loops())
def test_a_stall_is_answered_down_even_with_loop_recovery_zero(tmp_path: Path, loop: str) -> None:
    """With loop_recovery = 0s, a request that waited through a SIGSTOP twice max_loop_lag long is still
    answered 503: the stall is held at least until the heartbeat after the one that measured it."""
    got = _run_stalls(tmp_path, loop, "0s", LAG * 2, rounds=3)
    assert all(line.startswith(b"HTTP/1.1 503") for line in got), got


GROUPS = {
    "checks": [
        {"name": "mem", "type": "memory", "interval": "200ms", "timeout": "100ms", "rise": 1, "max_used_percent": 100},
        {"name": "db", "type": "tcp", "host": "127.0.0.1", "port": 1, "interval": "200ms", "timeout": "100ms",
         "critical": False},
    ],
    "groups": {"api": {"checks": ["db", "mem"]}},
}


async def _agent_check(address: tuple[str, int], send: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(*address)
    writer.write(send)
    await writer.drain()
    reply = await asyncio.wait_for(reader.read(4096), 5)
    writer.close()
    return reply


async def _up(agent) -> bool:
    return (await agent.get("/health"))[0] == 200


async def test_agent_send_without_a_newline_still_names_the_group(start_agent) -> None:
    """`agent-send "api"` (the name without its newline) gets the api group's verdict, never the node's:
    a node UP must not vouch for a group whose own check is down."""
    data = {**GROUPS, "agent": {"allow_root": True}, "agent_check": {"listen": "127.0.0.1:0"}}
    agent = await start_agent(data)
    from tests.helpers import async_wait_for

    await async_wait_for(lambda: _up(agent), what="node up")
    assert (await agent.get("/health/api"))[0] == 503
    assert (await _agent_check(agent.agent.agent_check_address, b"api\n")).startswith(b"down ")
    reply = await _agent_check(agent.agent.agent_check_address, b"api")
    assert reply.startswith(b"down "), reply


async def test_excluding_every_critical_check_does_not_serve_up(start_agent) -> None:
    """?exclude= naming every critical check leaves nothing to vouch for the node, so /health stays 503,
    as a config with no critical check is refused."""
    data = {"agent": {"allow_root": True}, "checks": [
        {"name": "db", "type": "tcp", "host": "127.0.0.1", "port": 1, "interval": "200ms", "timeout": "100ms"}]}
    agent = await start_agent(data)
    from tests.helpers import async_wait_for

    async def failed() -> bool:
        return agent.state.states["db"].last is not None

    await async_wait_for(failed, what="a first result")
    assert (await agent.get("/health"))[0] == 503
    code, body = await agent.get("/health?exclude=db&verbose")
    assert code == 503, body


def test_an_idle_agent_with_a_tiny_max_loop_lag_is_refused_or_never_stalled(tmp_path: Path) -> None:
    """max_loop_lag = 2ms is either refused at start (exit 2, naming the key) or honoured: an idle agent
    never answers /live 503 over 3 s of polling (the OS's own scheduling jitter exceeds 2 ms)."""
    cfg = agent_toml(policy={"max_loop_lag": "2ms", "loop_recovery": "0s"}) + memory_check(interval="1s",
                                                                                          timeout="500ms")
    proc, port = _start(tmp_path, cfg, "auto")
    try:
        first = wait_for(lambda: proc.poll() is not None or http_get(f"http://127.0.0.1:{port}/live")[0],
                         timeout=20, what="refused or serving")
        if proc.poll() is not None:
            assert proc.returncode == 2 and "max_loop_lag" in (tmp_path / "agent.log").read_text()
            return
        codes = [first]
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            codes.append(http_get(f"http://127.0.0.1:{port}/live")[0])
            time.sleep(0.01)  # the polling period of a busy load balancer, not a synchronisation
        assert codes.count(503) == 0, f"{codes.count(503)} of {len(codes)} polls said stalled"
    finally:
        proc.kill()
        proc.wait(5)


def test_a_short_stall_does_not_starve_the_systemd_watchdog(tmp_path: Path) -> None:
    """After a 0.8 s SIGSTOP, an agent under a 3 s systemd watchdog pings again before the watchdog
    expires, even with loop_recovery = 4s: a loop that runs again is alive, and a restart would turn a
    blip into a cold start (or, with a start limit, a dead service); else the agent refuses to start."""
    from tests.test_systemd import Listener

    address = f"@healthgate-hostile-{os.getpid()}-{time.monotonic_ns()}"
    listener = Listener(address)
    cfg = agent_toml(policy={"loop_recovery": "4s"}) + memory_check(interval="100ms", timeout="50ms")
    port = free_port()
    path = tmp_path / "healthgate.toml"
    path.write_text(cfg.replace("{port}", str(port)))
    env = {**{k: v for k, v in os.environ.items() if k != "STATE_DIRECTORY"}, "XDG_STATE_HOME": str(tmp_path),
           "NOTIFY_SOCKET": address, "WATCHDOG_USEC": "3000000"}
    proc = subprocess.Popen([sys.executable, "-m", "agent", "run", "-c", str(path)], cwd=ROOT,
                            stdout=open(tmp_path / "agent.log", "ab"), stderr=subprocess.STDOUT, env=env)  # noqa: SIM115
    try:
        wait_for(lambda: proc.poll() is not None or len(listener.times("WATCHDOG=1")) >= 2, timeout=20,
                 what="refused or pinging")
        if proc.poll() is not None:
            assert proc.returncode == 2 and "loop_recovery" in (tmp_path / "agent.log").read_text()
            return
        proc.send_signal(signal.SIGSTOP)
        try:
            wait_for(lambda: _stopped(proc.pid), timeout=5, interval=0.001, what="stopped")
            time.sleep(0.8)  # the stall itself
        finally:
            proc.send_signal(signal.SIGCONT)
        resumed = time.monotonic()
        wait_for(lambda: any(t > resumed for t in listener.times("WATCHDOG=1")) or time.monotonic() > resumed + 6,
                 timeout=10, what="a ping after the stall")
        pings = listener.times("WATCHDOG=1")
        gaps = [b - a for a, b in zip(pings, pings[1:], strict=False)]
        assert any(t > resumed for t in pings) and max(gaps) < 3.0, gaps
    finally:
        proc.kill()
        proc.wait(5)
        listener.close()

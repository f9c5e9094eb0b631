"""Fail closed after a stall: no consumer says UP for an answer that waited through a stalled loop."""

from __future__ import annotations

import signal
import socket
import time
from pathlib import Path

import pytest

from agent.config import parse_config
from agent.model import Result
from agent.state import AgentState
from tests.helpers import agent_toml, free_port, memory_check, toml_table, wait_for

MAX_LAG, RECOVERY = 0.5, 2.0


def _state() -> AgentState:
    cfg = parse_config({"agent": {"allow_root": True},
                        "policy": {"max_loop_lag": MAX_LAG, "loop_recovery": RECOVERY},
                        "checks": [{"name": "mem", "type": "memory", "interval": 1.0, "rise": 1}]})
    return AgentState(cfg, 0.0)


def _pass(t: float) -> Result:
    return Result(True, "", "ok", 0.001, t, t, 0.0)


def test_a_result_landing_before_the_heartbeat_after_a_stall_is_not_up() -> None:
    """A check result recorded right after a 1.5 s stall, before the heartbeat has measured the lag,
    publishes a new snapshot; the answer stays DOWN, and stays so for loop_recovery after the heartbeat."""
    state = _state()
    state.tick(0.0, 0.0)
    state.record("mem", _pass(0.0), 0.0)
    assert state.answer(0.05).up
    state.record("mem", _pass(1.5), 1.5)  # the first thing the loop does after the stall
    after = state.answer(1.5)
    assert not after.up and not after.live and after.reason == "agent stalled: no fresh verdict"
    state.tick(1.5, 1.4)  # the heartbeat runs next and measures the stall
    assert not state.answer(1.5).up
    t = 1.5
    while t < 1.5 + RECOVERY - 0.15:  # a healthy loop again: a heartbeat every 100 ms
        t += 0.1
        state.tick(t, 0.0)
        state.record("mem", _pass(t), t)
        assert not state.answer(t).up, t  # still recovering
    t = 1.5 + RECOVERY
    state.tick(t, 0.0)
    assert state.answer(t).up


def test_a_reload_landing_before_the_heartbeat_after_a_stall_is_not_up() -> None:
    """A reload applied right after a stall (its read blocked the loop) cannot make the agent look fresh."""
    state = _state()
    state.tick(0.0, 0.0)
    state.record("mem", _pass(0.0), 0.0)
    state.apply_config(state.config, 1.8)
    assert not state.answer(1.8).up


def _send(port: int, data: bytes) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    if data:
        s.sendall(data)
    return s


def _read_all(s: socket.socket) -> bytes:
    chunks = []
    try:
        while chunk := s.recv(65536):
            chunks.append(chunk)
    except TimeoutError:
        pass
    s.close()
    return b"".join(chunks)


def _request(path: str, accept: str = "*/*") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: x\r\nAccept: {accept}\r\nConnection: close\r\n\r\n".encode()


@pytest.mark.parametrize("stall", [0.8, 1.5])
def test_requests_queued_during_a_sigstop_are_all_answered_down(agent_process, tmp_path: Path, stall: float) -> None:
    """Every consumer asked while the agent was SIGSTOPped (for longer than max_loop_lag) answers DOWN once
    it runs again: /health on the fast path and through aiohttp, /live, /status, /metrics, the agent-check."""
    ac_port = free_port()
    cfg = (agent_toml(policy={"max_loop_lag": "500ms", "loop_recovery": "2s"})
           + toml_table("[agent_check]", listen=f"127.0.0.1:{ac_port}")
           + memory_check(interval="100ms", timeout="50ms"))
    agent = agent_process(cfg)
    wait_for(lambda: agent.get("/health")[0] == 200, what="up")
    wait_for(lambda: _read_all(_send(ac_port, b"")).startswith(b"up "), what="agent-check up")
    agent.signal(signal.SIGSTOP)
    try:
        socks = {
            "fast": _send(agent.port, _request("/health")),
            "verbose": _send(agent.port, _request("/health?verbose")),
            "live": _send(agent.port, _request("/live")),
            "status": _send(agent.port, _request("/status", "application/json")),
            "page": _send(agent.port, _request("/status", "text/html")),
            "metrics": _send(agent.port, _request("/metrics")),
            "agent-check": _send(ac_port, b""),
        }
        time.sleep(stall)  # the fault itself: the agent stays stopped this long
    finally:
        agent.signal(signal.SIGCONT)
    got = {name: _read_all(s) for name, s in socks.items()}
    for name in ("fast", "verbose", "live", "status", "page"):
        assert got[name].startswith(b"HTTP/1.1 503"), (name, got[name][:300])
    assert b'"status": "fail"' in got["status"]
    metrics = got["metrics"].decode()
    assert "\nhealthgate_up 0.0\n" in metrics and "\nhealthgate_live 0.0\n" in metrics, metrics[-2000:]
    assert got["agent-check"].startswith(b"down "), got["agent-check"]
    wait_for(lambda: agent.get("/health")[0] == 200, timeout=10, what="up again after loop_recovery")


async def _poll_codes(agent, seconds: float) -> list[int]:
    import asyncio

    codes = []
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    while loop.time() < end:
        codes.append((await agent.get("/health"))[0])
        await asyncio.sleep(0.01)
    return codes


async def test_a_healthy_idle_agent_never_looks_stalled_at_a_tight_lag_limit(start_agent) -> None:
    """With max_loop_lag at the old 100 ms heartbeat, a healthy idle agent is never reported stalled: the
    heartbeat comes several times within the limit."""
    from tests.helpers import async_wait_for

    agent = await start_agent({"policy": {"max_loop_lag": "100ms", "loop_recovery": "0s"},
                               "checks": [{"name": "mem", "type": "memory", "interval": "200ms", "timeout": "100ms",
                                           "rise": 1, "max_used_percent": 100}]})
    await async_wait_for(lambda: _up(agent), what="up")
    codes = await _poll_codes(agent, 3.0)
    assert codes.count(503) == 0, f"{codes.count(503)} of {len(codes)} polls answered 503"


async def test_jitter_never_makes_an_always_passing_check_stale(start_agent) -> None:
    """A check whose interval is stretched by its jitter beyond interval + timeout + stale_grace is still
    fresh: the staleness limit allows for the jitter, so an always-passing check never reads 503."""
    from tests.helpers import async_wait_for

    agent = await start_agent({"policy": {"stale_grace": "50ms"},
                               "checks": [{"name": "mem", "type": "memory", "interval": "1s", "timeout": "100ms",
                                           "jitter": 0.5, "rise": 1, "max_used_percent": 100}]})
    await async_wait_for(lambda: _up(agent), what="up")
    codes = await _poll_codes(agent, 6.0)
    assert codes.count(503) == 0, f"{codes.count(503)} of {len(codes)} polls answered 503"


async def _up(agent) -> bool:
    return (await agent.get("/health"))[0] == 200

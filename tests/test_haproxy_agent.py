"""The agent-check reply (format_reply tables, HAProxy's grammar) and the TCP server's containment."""

from __future__ import annotations

import asyncio
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.model import Admin
from agent.serving import haproxy_agent
from agent.serving.haproxy_agent import format_reply
from tests.helpers import answer_for, async_wait_for


@pytest.mark.parametrize("answer, weight, expected", [
    (answer_for(), 80, "up ready 80%\n"),
    (answer_for(), None, "up ready 100%\n"),  # nothing measured: full weight
    (answer_for(), 0, "up ready 1%\n"),  # never 0% (HAProxy would show that as DRAIN)
    (answer_for(), 250, "up ready 100%\n"),
    (answer_for(False, "db: tcp 127.0.0.1:6379: connection refused"), 80,
     "down ready #db: tcp 127.0.0.1:6379: connection refused\n"),
    (answer_for(False, ""), None, "down ready #down\n"),
    (answer_for(admin=Admin.DRAIN, admin_reason="deploy 42"), 70, "up drain 70% #deploy 42\n"),
    (answer_for(admin=Admin.DRAIN), 70, "up drain 70% #drain\n"),
    (answer_for(False, "db: timeout after 500 ms", Admin.DRAIN, "deploy 42"), 70,
     "down drain #deploy 42; db: timeout after 500 ms\n"),
    (answer_for(admin=Admin.MAINT, admin_reason="kernel update"), 50, "up maint 50% #kernel update\n"),
    (answer_for(admin=Admin.MAINT, admin_reason="kernel update", stopping=True), None,
     "down maint #kernel update; shutting down\n"),
    (answer_for(stopping=True), 90, "down ready #shutting down\n"),
    (answer_for(loop_ok=False), 90, "down ready #event loop lag 900 ms > 500 ms\n"),
    (answer_for(fresh=False), 80, "down ready #agent stalled: no fresh verdict\n"),  # a stale snapshot can't vouch
    (answer_for(False, "db: bad\r\nup ready 100%\x00\x1b[31m é"), None,
     "down ready #db: bad up ready 100%??[31m ?\n"),  # one line, printable ASCII only
    (answer_for(False, "disk: " + "x" * 300), None, "down ready #disk: " + "x" * 111 + "...\n"),
])
def test_format_reply(answer, weight: int | None, expected: str) -> None:
    """Every reply carries the health word, the admin word, the weight when up, and one sanitised reason."""
    assert format_reply(answer, weight) == expected


def haproxy_parse(line: str) -> dict[str, str]:
    """HAProxy 2.6's agent-check reply parser (tcpcheck_agent_expect_reply), reduced to what it sets.

    Words are separated by spaces, tabs or commas; `#` starts the description; unknown words are errors.
    """
    assert line.endswith("\n") and "\n" not in line[:-1] and "\r" not in line
    out: dict[str, str] = {}
    rest = line[:-1]
    i = 0
    while i < len(rest):
        if rest[i] in " \t,":
            i += 1
            continue
        if rest[i] == "#":
            out["desc"] = rest[i + 1:].lstrip(" \t")
            break
        j = i
        while j < len(rest) and rest[j] not in " \t,":
            j += 1
        word = rest[i:j].lower()
        if word in ("up", "down", "fail", "stopped"):
            out["health"] = word
        elif word in ("ready", "drain", "maint"):
            out["admin"] = word
        elif word[:1].isdigit() and "%" in word:
            out["weight"] = word
        else:
            out.setdefault("error", word)
        i = j
    return out


@given(up=st.booleans(), fresh=st.booleans(), admin=st.sampled_from(list(Admin)), reason=st.text(max_size=400),
       admin_reason=st.text(max_size=400), weight=st.one_of(st.none(), st.integers(-5, 500)))
def test_reply_is_always_one_line_haproxy_accepts(up, fresh, admin, reason, admin_reason, weight) -> None:
    """For any state and any reason text, the reply is one ASCII line whose words HAProxy reads as
    exactly the health, admin state and weight we meant, with no word it would reject."""
    line = format_reply(answer_for(up, reason, admin, admin_reason, fresh), weight)
    assert line.isascii() and len(line) < 200
    assert re.fullmatch(r"(up|down) (ready|drain|maint)( \d{1,3}%)?( #[ -~]*)?\n", line), line
    parsed = haproxy_parse(line)
    assert "error" not in parsed
    assert parsed["health"] == ("up" if up and fresh else "down")
    assert parsed["admin"] == admin.value
    assert ("weight" in parsed) == (up and fresh)
    if "weight" in parsed:
        assert 1 <= int(parsed["weight"][:-1]) <= 100


# -- the server ------------------------------------------------------------------------------------------

MEM = {"name": "mem", "type": "memory", "interval": "200ms", "timeout": "100ms", "rise": 1,
       "max_used_percent": 100}


def agent_config(**agent_check) -> dict:
    return {"agent_check": {"listen": "127.0.0.1:0", "slow_start": 0, "weight_source": "off", **agent_check},
            "server": {"shutdown_drain": "1s"}, "checks": [MEM]}


async def ask(port: int, send: bytes = b"") -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        if send:
            writer.write(send)
        return await asyncio.wait_for(reader.read(), 3)  # until the agent closes
    finally:
        writer.close()


async def test_one_line_then_close(start_agent) -> None:
    """Each connection gets exactly one line ending in a newline, then the agent closes, with or without agent-send."""
    agent = await start_agent(agent_config())
    port = agent.agent.agent_check_address[1]
    await async_wait_for(lambda: ask(port), what="a reply")
    await async_wait_for(lambda: _is(ask(port), b"up ready 100%\n"), what="up")
    assert await ask(port, b"backend-a\n") == b"up ready 100%\n"
    assert await ask(port, b"no newline at all") == b"up ready 100%\n"


async def _is(coro, expected: bytes) -> bool:
    return await coro == expected


async def test_answers_down_during_shutdown_drain(start_agent) -> None:
    """Once SIGTERM's drain starts, the agent-check answers down while the listener is still open."""
    agent = await start_agent(agent_config())
    port = agent.agent.agent_check_address[1]
    await async_wait_for(lambda: _is(ask(port), b"up ready 100%\n"), what="up")
    drain = asyncio.create_task(agent.agent.drain())
    try:
        assert await ask(port) == b"down ready #shutting down\n"
    finally:
        await drain


async def test_silent_client_is_closed_and_cap_holds(start_agent, monkeypatch) -> None:
    """A client that never closes is cut off by the deadline, and connections over the cap are closed
    unanswered, so slow clients cannot hold the agent-check."""
    monkeypatch.setattr(haproxy_agent, "READ_WAIT", 30.0)  # holders keep their slot until CONN_DEADLINE
    agent = await start_agent(agent_config(max_connections=2))
    server = agent.agent.agent_check
    port = agent.agent.agent_check_address[1]
    holders = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
    try:
        for reader, _ in holders:
            assert (await asyncio.wait_for(reader.readline(), 3)).endswith(b"\n")
        await async_wait_for(lambda: _true(server.active == 2), what="two held connections")
        refused = server.refused
        try:
            assert await ask(port) == b""  # over the cap: closed without a word
        except ConnectionResetError:
            pass
        assert server.refused == refused + 1
        for reader, _ in holders:  # the deadline ends the silent clients
            assert await asyncio.wait_for(reader.read(), 3) == b""
        assert server.active == 0
        assert (await ask(port)).endswith(b"\n")
    finally:
        for _, writer in holders:
            writer.close()


async def _true(value: bool) -> bool:
    return value


async def load_weighted_agent(tmp_path, slow_start: str = "1500ms"):
    """An Agent whose weight follows the load average of a fixture /proc (tmp_path/proc, 75% headroom), with
    a 1.5 s slow start (unless told) from a 10% floor; its state directory is tmp_path/state."""
    from agent.app import Agent
    from agent.config import parse_config

    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "stat").write_text("cpu  1 0 1 8 0 0 0 0 0 0\n" + "".join(f"cpu{i} 1 0 1 8 0\n" for i in range(4)))
    (proc / "loadavg").write_text("1.00 1.00 1.00 1/100 4242\n")  # 4 CPUs, load 1: 75% headroom
    (proc / "meminfo").write_text("MemTotal: 1000 kB\nMemAvailable: 500 kB\n")  # for the memory check
    agent = Agent(parse_config({
        "server": {"listen": "127.0.0.1:0"}, "agent": {"state_dir": str(tmp_path / "state")},
        "agent_check": {"listen": "127.0.0.1:0", "weight_source": "load", "weight_smoothing": 0,
                        "slow_start": slow_start, "weight_floor": 10},
        "checks": [MEM]}))
    agent.ctx.proc = proc
    await agent.start()
    return agent


async def test_weight_ramps_after_recovery_then_follows_load(tmp_path) -> None:
    """A running agent's weight starts at the floor when the node comes up, ramps to the load headroom over
    slow_start, then follows the load its own task samples from /proc."""
    proc = tmp_path / "proc"
    agent = await load_weighted_agent(tmp_path)
    try:
        port = agent.agent_check_address[1]
        first = await async_wait_for(lambda: _up(ask(port)), what="up")
        assert 10 <= first <= 40, first  # at most a heartbeat or two into the ramp
        await async_wait_for(lambda: _weight_is(ask(port), 75), timeout=5, what="ramped to 75%")
        (proc / "loadavg").write_text("3.00 1.00 1.00 1/100 4242\n")  # 25% headroom
        await async_wait_for(lambda: _weight_is(ask(port), 25), timeout=5, what="follows the load")
        (proc / "loadavg").write_text("40.00 1.00 1.00 1/100 4242\n")  # overloaded: the floor, not 0
        await async_wait_for(lambda: _weight_is(ask(port), 10), timeout=5, what="the floor")
    finally:
        await agent.stop()


async def _up(coro) -> int | None:
    m = re.fullmatch(rb"up ready (\d+)%\n", await coro)
    return int(m.group(1)) if m else None


async def _weight_is(coro, weight: int) -> bool:
    return await _up(coro) == weight


async def test_weight_ramps_again_after_drain_or_maintenance(tmp_path) -> None:
    """Set back to ready after drain, and again after maintenance, the agent-check weight starts at the floor
    and ramps over slow_start, as after a recovery from DOWN, instead of jumping back to full headroom."""
    from agent.cli.admin import set_admin_cli

    state_dir = str(tmp_path / "state")
    # A 6 s ramp: the first reply after `ready` is read long before the ramp could end, even on a loaded machine.
    agent = await load_weighted_agent(tmp_path, slow_start="6s")
    try:
        port = agent.agent_check_address[1]
        await async_wait_for(lambda: _weight_is(ask(port), 75), timeout=20, what="ramped to 75%")
        for action in ("drain", "maint"):  # one agent for both: each ramp takes slow_start
            assert set_admin_cli(state_dir, action, "rack move", None, None)[0] is not None
            await async_wait_for(lambda a=action: _starts(ask(port), f"up {a} ".encode()), timeout=5, what=action)
            assert set_admin_cli(state_dir, "ready", "", None, None)[0] is not None
            back = await async_wait_for(lambda: _up(ask(port)), timeout=5, what=f"ready after {action}")
            assert 10 <= back <= 40, (action, back)  # from the floor, not straight back to 75
            await async_wait_for(lambda: _weight_is(ask(port), 75), timeout=15, what=f"ramped to 75% after {action}")
    finally:
        await agent.stop()


async def _starts(coro, prefix: bytes) -> bool:
    return (await coro).startswith(prefix)

"""Reloads: the config is read off the loop, bounded and one reload at a time; a bad or hung file keeps the old one."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from pathlib import Path

from agent import app as app_mod
from tests.helpers import async_wait_for, memory_check, scrape, toml_table, wait_for
from tests.test_haproxy_agent import MEM
from tests.test_lifecycle import BASE
from tests.test_lifecycle import MEM as TOML_MEM


def release(fifo: Path, content: str = "") -> threading.Thread:
    """Hand `content` to whoever is blocked opening the FIFO for reading (from a thread: the open blocks)."""

    def write() -> None:
        with open(fifo, "w") as f:
            f.write(content)

    t = threading.Thread(target=write, daemon=True)
    t.start()
    return t


def config_text(state_dir: Path, *checks: str) -> str:
    return toml_table("[agent]", state_dir=str(state_dir)) + "".join(memory_check(c) for c in checks)


async def _up(agent) -> bool:
    return (await agent.get("/health"))[0] == 200


def test_sighup_reads_the_config_off_the_loop(agent_process, tmp_path: Path) -> None:
    """While a SIGHUP's config read blocks for 2 s (a FIFO nobody writes yet), /health keeps answering 200
    at once; when the file arrives, it is applied."""
    agent = agent_process(BASE % "0s" + TOML_MEM % "mem")
    wait_for(lambda: agent.get("/health")[0] == 200, what="up")
    new = agent.path.read_text() + TOML_MEM % "mem2"
    agent.path.unlink()
    os.mkfifo(agent.path, 0o644)
    agent.signal(signal.SIGHUP)
    t0 = time.monotonic()
    worst, answers = 0.0, []
    while time.monotonic() - t0 < 2.0:  # the read stays blocked all this time
        t = time.monotonic()
        answers.append(agent.get("/health", timeout=1.5)[0])
        worst = max(worst, time.monotonic() - t)
        time.sleep(0.02)
    assert set(answers) == {200} and len(answers) > 20, answers
    assert worst < 0.5, f"/health took {worst:.2f}s during the blocked read"
    assert scrape(agent.url).get("healthgate_config_reloads_total", 0) == 0  # still reading
    release(agent.path, new).join(5)
    wait_for(lambda: scrape(agent.url).get("healthgate_config_reloads_total") == 1, timeout=5, what="reloaded")
    assert sorted(json.loads(agent.get("/status")[1])["checks"]) == ["mem2:memory", "mem:memory"]
    wait_for(lambda: agent.get("/health")[0] == 200, what="up once the new check passed")


async def test_reload_that_hangs_keeps_the_old_config(start_agent, tmp_path: Path, monkeypatch) -> None:
    """A reload whose read outlives RELOAD_TIMEOUT is refused and counted, the old config keeps serving, and
    a reload while that read is still stuck fails at once instead of starting a second read."""
    monkeypatch.setattr(app_mod, "RELOAD_TIMEOUT", 0.3)
    fifo = tmp_path / "c.toml"
    os.mkfifo(fifo, 0o644)
    agent = await start_agent({"checks": [MEM]}, config_path=str(fifo))
    await async_wait_for(lambda: _up(agent), what="up")
    try:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        assert await agent.agent.reload() is False
        assert 0.3 <= loop.time() - t0 < 1.0
        t0 = loop.time()
        assert await agent.agent.reload() is False
        assert loop.time() - t0 < 0.1  # refused at once: the first read still holds its thread
        assert agent.state.reloads == {"failure": 2}
        assert "healthgate_config_reload_failures_total 2.0" in (await agent.get("/metrics"))[1]
        assert [v.name for v in agent.state.snapshot.checks] == [MEM["name"]]
        assert await _up(agent)
    finally:
        await asyncio.to_thread(release(fifo).join, 5)


async def test_sighups_during_a_reload_coalesce(start_agent, tmp_path: Path) -> None:
    """Reloads run one at a time: SIGHUPs that arrive while one reads the file make one more reload after
    it, which reads the file as it is by then."""
    fifo = tmp_path / "c.toml"
    os.mkfifo(fifo, 0o644)
    agent = await start_agent({"checks": [MEM]}, config_path=str(fifo))
    a = agent.agent
    a.request_reload()
    await async_wait_for(lambda: _async("config" in a._slots), what="the first reload reading the FIFO")
    for _ in range(3):
        a.request_reload()
    regular = tmp_path / "next.toml"
    regular.write_text(config_text(tmp_path / "state", "mem", "second"))

    def hand_over() -> None:
        with open(fifo, "w") as f:  # the first reload reads this...
            os.replace(regular, fifo)  # ...and the next one the regular file now at its path
            f.write(config_text(tmp_path / "state", "mem", "first"))

    await asyncio.to_thread(hand_over)
    await async_wait_for(lambda: _async(agent.state.reloads["success"] == 2), timeout=5, what="two reloads")
    assert not a._reload_wanted.is_set() and agent.state.reloads["success"] == 2
    assert [v.name for v in agent.state.snapshot.checks] == ["mem", "second"]


async def _async(v):
    return v

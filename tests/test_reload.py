"""Reloads: the config is read off the loop, bounded and one reload at a time; a bad or hung file keeps the old one."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from agent import app as app_mod
from agent.admin import make_record, read_record, state_path, write_record
from agent.config import parse_config
from agent.model import Admin
from agent.scheduler import WARM_UP_MAX, warm_up_bound
from tests.helpers import async_wait_for, free_port, memory_check, scrape, toml_table, wait_for
from tests.test_admin import run_cli
from tests.test_haproxy_agent import MEM
from tests.test_lifecycle import BASE
from tests.test_lifecycle import MEM as TOML_MEM

NO_WATCH = {"watch_config": False}  # in-process tests that reload by themselves


def release(fifo: Path, content: str = "") -> threading.Thread:
    """Hand `content` to whoever is blocked opening the FIFO for reading (from a thread: the open blocks)."""

    def write() -> None:
        with open(fifo, "w") as f:
            f.write(content)

    t = threading.Thread(target=write, daemon=True)
    t.start()
    return t


def config_text(state_dir: Path, *checks: str, watch: bool = False) -> str:
    """A config file for an in-process agent whose test reloads it by itself (the watcher off unless asked)."""
    return (toml_table("[server]", trusted_networks=["127.0.0.1/32"])
            + toml_table("[agent]", state_dir=str(state_dir), watch_config=watch)
            + "".join(memory_check(c) for c in checks))


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
    agent = await start_agent({"checks": [MEM], "agent": NO_WATCH}, config_path=str(fifo))
    await async_wait_for(lambda: _up(agent), what="up")
    try:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        assert await agent.agent.reload() is False
        assert 0.29 <= loop.time() - t0 < 1.0  # uvloop timers have a resolution of 1 ms
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
    agent = await start_agent({"checks": [MEM], "agent": NO_WATCH}, config_path=str(fifo))
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


# -- a reload that moves state_dir ------------------------------------------------------------------------

async def _in_maintenance(tmp_path: Path, start_agent):
    """An agent reading `c.toml`, in maintenance from the state file in tmp_path/old."""
    path = tmp_path / "c.toml"
    path.write_text(config_text(tmp_path / "old", "mem"))
    agent = await start_agent({"checks": [MEM], "agent": {**NO_WATCH, "state_dir": str(tmp_path / "old")}},
                              config_path=str(path))
    write_record(tmp_path / "old", make_record(Admin.MAINT, "kernel update", source="cli"))
    await async_wait_for(lambda: _async(agent.state.admin is Admin.MAINT), timeout=3, what="maint")
    return agent, path


async def test_reload_moving_state_dir_carries_maintenance_over(start_agent, tmp_path: Path) -> None:
    """A reload that moves state_dir to a directory without a state file takes the maintenance along: the
    record is written there, the node stays in maintenance, and the new file is the one that counts."""
    agent, path = await _in_maintenance(tmp_path, start_agent)
    path.write_text(config_text(tmp_path / "new", "mem"))
    assert await agent.agent.reload() is True
    carried = read_record(state_path(tmp_path / "new"))
    assert (carried.admin, carried.reason) == (Admin.MAINT, "kernel update")
    watcher = agent.agent.admin
    await async_wait_for(lambda: _async(watcher._sig[1] == state_path(tmp_path / "new")), timeout=3,
                         what="the watcher looking at the new file")
    assert (agent.state.admin, agent.state.admin_reason) == (Admin.MAINT, "kernel update")
    assert (await agent.get("/health"))[0] == 503
    write_record(tmp_path / "new", make_record(Admin.READY, source="cli"))  # `ready` with the new config
    await async_wait_for(lambda: _up(agent), timeout=3, what="ready from the new file")


async def test_reload_moving_state_dir_onto_a_conflicting_file_is_refused(start_agent, tmp_path: Path) -> None:
    """A reload that would move state_dir onto a state file saying something else, or onto a directory that
    can't be written, is refused with a clear error: the old config and the maintenance stay."""
    agent, path = await _in_maintenance(tmp_path, start_agent)
    write_record(tmp_path / "new", make_record(Admin.READY, "long ago", source="cli"))
    path.write_text(config_text(tmp_path / "new", "mem"))
    assert await agent.agent.reload() is False
    blocker = tmp_path / "file"
    blocker.write_text("")
    path.write_text(config_text(blocker / "state", "mem"))
    assert await agent.agent.reload() is False
    assert agent.state.reloads == {"failure": 2}
    assert agent.state.config.agent.state_dir == str(tmp_path / "old")
    assert (agent.state.admin, agent.state.admin_reason) == (Admin.MAINT, "kernel update")
    assert (await agent.get("/health"))[0] == 503
    assert read_record(state_path(tmp_path / "new")).admin is Admin.READY  # the operator's file is untouched


def test_moved_state_dir_end_to_end(agent_process, tmp_path: Path) -> None:
    """Against a real agent in maintenance: a SIGHUP moving state_dir onto a conflicting file is refused and
    logged with both files, one onto an empty directory carries maintenance over, and `ready` with the new
    config then ends it, confirmed."""
    def config(state_dir: Path) -> str:
        return (BASE % "0s").replace("allow_root = true", f'allow_root = true\nstate_dir = "{state_dir}"') + \
            TOML_MEM % "mem"

    agent = agent_process(config(tmp_path / "old"))
    assert run_cli("maint", "-c", str(agent.path), "--reason", "disk swap").returncode == 0
    write_record(tmp_path / "new", make_record(Admin.READY, "long ago", source="cli"))
    agent.path.write_text(config(tmp_path / "new").replace("{port}", str(agent.port)))
    agent.signal(signal.SIGHUP)
    wait_for(lambda: scrape(agent.url).get("healthgate_config_reload_failures_total") == 1, timeout=5,
             what="the reload refused")
    assert (f"agent.state_dir: {tmp_path / 'new' / 'admin.json'} says ready (long ago) but the node is in maint "
            f"from {tmp_path / 'old' / 'admin.json'}; the reload is refused so that maint is not lost") in agent.logs()
    assert agent.get("/health")[0] == 503

    state_path(tmp_path / "new").unlink()
    agent.signal(signal.SIGHUP)
    wait_for(lambda: scrape(agent.url).get("healthgate_config_reloads_total") == 1, timeout=5, what="reloaded")
    assert agent.get("/health")[0] == 503
    assert json.loads(agent.get("/status")[1])["healthgate"]["adminReason"] == "disk swap"
    proc = run_cli("ready", "-c", str(agent.path))
    assert (proc.returncode, proc.stderr) == (0, ""), proc.stderr
    wait_for(lambda: agent.get("/health")[0] == 200, timeout=3, what="ready")


# -- make before break ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("rises, timeouts, expected", [
    ((), (), 0.0),  # nothing new: no wait at all
    ((1,), (0.1,), 0.6),
    ((3, 1), (0.2, 0.5), 1.1),  # the longest of rise x timeout, plus slack
    ((100,), (3600.0,), WARM_UP_MAX),  # never longer than the cap
])
def test_warm_up_bound(rises: tuple[int, ...], timeouts: tuple[float, ...], expected: float) -> None:
    """A reload waits for its new checks' first samples at most the longest rise x timeout plus slack, capped."""
    checks = [parse_config({"checks": [{**MEM, "name": f"c{i}", "rise": r, "timeout": t, "interval": 3601}]}).checks[0]
              for i, (r, t) in enumerate(zip(rises, timeouts, strict=True))]
    assert warm_up_bound(checks) == pytest.approx(expected)


async def _poll_health(agent, codes: list[int], stop: asyncio.Event) -> None:
    while not stop.is_set():
        codes.append((await agent.get("/health"))[0])
        await asyncio.sleep(0.01)


async def test_reload_changing_a_threshold_keeps_the_node_up_and_its_history(start_agent, tmp_path: Path) -> None:
    """A reload that changes one check's threshold and adds a passing one never serves 503: both are sampled
    beside the running config and swapped in already UP; the transition counters, the weight ramp and the
    changed check's flap history are what they were."""
    path = tmp_path / "c.toml"
    agent = await start_agent({"checks": [MEM], "agent": NO_WATCH,
                               "agent_check": {"listen": "127.0.0.1:0", "weight_source": "off"}}, config_path=str(path))
    await async_wait_for(lambda: _up(agent), what="up")
    weights = agent.agent.agent_check.weights
    await async_wait_for(lambda: _async(weights.model.serving_since is not None), what="the ramp started")
    ramp, transitions = weights.model.serving_since, dict(agent.state.transitions)
    flaps = (1.0, 2.0)
    agent.state.states[MEM["name"]] = replace(agent.state.states[MEM["name"]], flaps=flaps)
    path.write_text(toml_table("[agent]", state_dir=str(tmp_path / "state"), watch_config=False) +
                    toml_table("[agent_check]", listen="127.0.0.1:0", weight_source="off") +
                    memory_check(MEM["name"], max_used_percent=99.9) + memory_check("added", rise=3))
    codes: list[int] = []
    stop = asyncio.Event()
    poller = asyncio.create_task(_poll_health(agent, codes, stop))
    try:
        await async_wait_for(lambda: _async(len(codes) > 5), what="polling")
        assert await agent.agent.reload() is True
        await async_wait_for(lambda: _async(agent.state.stats["added"].count >= 5), what="the new loop sampling")
    finally:
        stop.set()
        await poller
    assert set(codes) == {200}, codes
    assert agent.state.states["added"].status.value == "up"
    assert agent.state.states[MEM["name"]].flaps == flaps
    assert dict(agent.state.transitions) == transitions and weights.model.serving_since == ramp


async def test_reload_adding_a_failing_critical_check_goes_down_at_the_swap(start_agent, tmp_path: Path) -> None:
    """A reload that adds a failing critical check goes DOWN in the swap itself, with the check's first
    result as the reason: the new config says so."""
    path = tmp_path / "c.toml"
    agent = await start_agent({"checks": [MEM], "agent": NO_WATCH}, config_path=str(path))
    await async_wait_for(lambda: _up(agent), what="up")
    port = free_port()
    path.write_text(config_text(tmp_path / "state", MEM["name"]) + toml_table(
        "[[checks]]", name="db", type="tcp", port=port, interval="200ms", timeout="100ms", rise=1))
    assert await agent.agent.reload() is True
    status, text = await agent.get("/health?verbose")
    assert status == 503 and f"db failed: tcp 127.0.0.1:{port}: connection refused" in text, text
    assert agent.state.transitions["down"] == 1


def test_sighup_reloads_never_answer_503(agent_process, tmp_path: Path) -> None:
    """Against a real agent polled every 10 ms: a SIGHUP changing a threshold, then one adding a passing check,
    never answer 503; one adding a failing critical check goes DOWN once its sample says so."""
    head = BASE % "0s"
    agent = agent_process(head + TOML_MEM % "mem")
    wait_for(lambda: agent.get("/health")[0] == 200, what="up")
    head = head.replace("{port}", str(agent.port))
    longest = 0.0
    for n, text in enumerate([head + (TOML_MEM % "mem").replace("= 100", "= 99.9"),
                              head + (TOML_MEM % "mem").replace("= 100", "= 99.9") + memory_check("more", rise=3)],
                             start=1):
        agent.path.write_text(text)
        codes = []
        t0 = time.monotonic()
        agent.signal(signal.SIGHUP)
        while scrape(agent.url).get("healthgate_config_reloads_total") != n:
            codes.append(agent.get("/health")[0])
            assert time.monotonic() - t0 < 10, "no reload"
            time.sleep(0.01)
        longest = max(longest, time.monotonic() - t0)
        for _ in range(50):  # and after the swap, while the restarted loops take their own samples
            codes.append(agent.get("/health")[0])
            time.sleep(0.01)
        assert set(codes) == {200}, codes
    assert scrape(agent.url).get('healthgate_transitions_total{to="down"}') == 0
    assert longest < 2.0, longest
    port = free_port()
    agent.path.write_text(text + toml_table("[[checks]]", name="db", type="tcp", port=port, interval="200ms",
                                            timeout="100ms", rise=1))
    agent.signal(signal.SIGHUP)
    wait_for(lambda: agent.get("/health")[0] == 503, timeout=3, what="down for the new failing check")
    assert "connection refused" in agent.get("/health?verbose")[1]

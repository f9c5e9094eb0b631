"""Node-load probes (cpu, load, memory, swap, pressure, fds): the real /proc once each, thresholds on recorded files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from agent.probes.base import Context
from tests.helpers import async_wait_for
from tests.probing import PROC, check, proc_copy, sample

IDLE, BUSY = PROC / "idle", PROC / "busy"
HAS_PSI = Path("/proc/pressure/memory").exists()


# --- the real /proc: each probe reads it and reports a plausible value with its unit ---------------------

async def test_cpu_reads_real_proc() -> None:
    """cpu measures a first sample over a short pair of reads, then each sample since the previous one."""
    ctx = Context()
    cfg = check(type="cpu", max_percent=100)
    first = await sample(cfg, ctx)
    second = await sample(cfg, ctx)
    for r in (first, second):
        assert r.ok, r.reason
        assert 0 <= r.observation.value <= 100 and r.observation.unit == "percent"
        assert {name for name, _, _ in r.observation.values} == {"iowait", "steal"}
    assert first.duration >= 0.1  # the first sample waited between its two reads (without blocking the loop)


async def test_load_reads_real_proc() -> None:
    """load divides the real load average by the CPUs listed in /proc/stat."""
    r = await sample(check(type="load", max_per_cpu=1000))
    assert r.ok, r.reason
    series = {name: value for name, value, _ in r.observation.values}
    assert series["cpus"] >= 1
    assert r.observation.value == pytest.approx(series["load1"] / series["cpus"], abs=0.001)
    assert r.observation.unit == "per_cpu"


async def test_memory_reads_real_proc() -> None:
    """memory reports the real share in use and the bytes available."""
    r = await sample(check(type="memory", max_used_percent=100))
    assert r.ok, r.reason
    assert 0 < r.observation.value < 100 and r.observation.unit == "percent"
    series = {name: value for name, value, _ in r.observation.values}
    assert 0 < series["available"] <= series["total"]


async def test_swap_reads_real_proc() -> None:
    """swap passes on this node at any bound with no swap, or reports the real share in use."""
    r = await sample(check(type="swap", max_used_percent=100))
    assert r.ok, r.reason
    assert 0 <= r.observation.value <= 100 and r.observation.unit == "percent"


async def test_pressure_reads_real_proc() -> None:
    """pressure reads the real PSI averages, or fails saying the kernel has none."""
    r = await sample(check(type="pressure", resource="memory", max_avg10=100))
    if not HAS_PSI:
        assert not r.ok and r.kind == "unsupported" and "this kernel has no PSI" in r.reason
        return
    assert r.ok, r.reason
    assert 0 <= r.observation.value <= 100 and r.observation.unit == "percent"


async def test_fds_reads_real_proc() -> None:
    """fds compares the real system handles with fs.file-max."""
    r = await sample(check(type="fds", max_used_percent=100))
    assert r.ok, r.reason
    series = {name: value for name, value, _ in r.observation.values}
    assert 0 < series["open"] < series["limit"]


# --- thresholds on recorded /proc files ------------------------------------------------------------------

@pytest.mark.parametrize("keys, ok, value, reason", [
    ({"minutes": 1, "max_per_cpu": 2}, False, 2.55, "load: load1 5.1 on 2 CPU(s) = 2.55 per CPU > 2"),
    ({"minutes": 1, "max_per_cpu": 3}, True, 2.55, ""),
    ({"minutes": 5, "max_per_cpu": 2}, True, 1.6, ""),
    ({"minutes": 15, "max_per_cpu": 0.5}, False, 0.525, "load: load15 1.05 on 2 CPU(s) = 0.525 per CPU > 0.5"),
])
async def test_load_thresholds(keys: dict, ok: bool, value: float, reason: str) -> None:
    """load fails when the chosen average per CPU exceeds max_per_cpu."""
    r = await sample(check(type="load", **keys), Context(proc=BUSY))
    assert (r.ok, r.observation.value, r.reason) == (ok, value, reason)


@pytest.mark.parametrize("proc, keys, ok, reason", [
    (BUSY, {"max_used_percent": 95}, False, "memory: 97.0% used > 95%"),
    (BUSY, {"max_used_percent": 98}, True, ""),
    (BUSY, {"max_used_percent": 98, "min_available": "1GiB"}, False, "memory: 723.2 MiB available < 1.0 GiB"),
    (BUSY, {"max_used_percent": 98, "min_available": "512MiB"}, True, ""),
    (IDLE, {"max_used_percent": 90}, True, ""),
])
async def test_memory_thresholds(proc: Path, keys: dict, ok: bool, reason: str) -> None:
    """memory fails above max_used_percent, or below min_available."""
    r = await sample(check(type="memory", **keys), Context(proc=proc))
    assert (r.ok, r.reason) == (ok, reason)


async def test_memory_fails_on_a_garbled_line_it_reads_and_ignores_the_rest(tmp_path: Path) -> None:
    """The memory check parses MemTotal, MemFree and MemAvailable only, up to the last of them: a garbled
    line of one of them fails the sample (it cannot vouch for a figure it cannot read); a garbled line of
    another key, which the figure does not use, changes nothing."""
    (tmp_path / "meminfo").write_text("MemTotal: 1000 kB\nMemFree: 100 kB\nMemAvailable: 9x0 kB\n")
    bad = await sample(check(type="memory", max_used_percent=100), Context(proc=tmp_path))
    assert not bad.ok and bad.kind == "error", bad
    (tmp_path / "meminfo").write_text("MemTotal: 1000 kB\nBuffers: \x00garbage kB\nMemFree: 100 kB\n"
                                      "MemAvailable: 900 kB\nCached: junk\n")
    good = await sample(check(type="memory", max_used_percent=100), Context(proc=tmp_path))
    assert good.ok and good.observation.value == 10.0, good


def test_a_key_listed_twice_keeps_its_last_value_before_the_last_wanted_key(tmp_path: Path) -> None:
    """No kernel lists a key twice; should a file do so before the last wanted key, the keyed read keeps
    the later value as the full read does, and still reads on to MemAvailable."""
    from agent.probes.memory import MEMORY_KEYS, read_meminfo

    (tmp_path / "meminfo").write_text("MemTotal: 1000 kB\nMemTotal: 2000 kB\nMemFree: 100 kB\n"
                                      "MemAvailable: 900 kB\n")
    assert read_meminfo(tmp_path, MEMORY_KEYS) == read_meminfo(tmp_path) == {
        "MemTotal": 2048000, "MemFree": 102400, "MemAvailable": 921600}


@pytest.mark.parametrize("proc, bound, ok, value, text", [
    (IDLE, 0, True, 0.0, "no swap configured"),
    (BUSY, 80, True, 75.0, "75.0% used (1.5 GiB of 2.0 GiB)"),
    (BUSY, 50, False, 75.0, "swap: 75.0% used (1.5 GiB of 2.0 GiB) > 50%"),
])
async def test_swap_thresholds(proc: Path, bound: float, ok: bool, value: float, text: str) -> None:
    """swap fails above max_used_percent; a node with no swap passes with 0%."""
    r = await sample(check(type="swap", max_used_percent=bound), Context(proc=proc))
    assert (r.ok, r.observation.value) == (ok, value)
    assert (r.observation.detail if ok else r.reason) == text


@pytest.mark.parametrize("keys, ok, reason", [
    ({"resource": "memory", "max_avg10": 40}, False, "pressure memory some: avg10 42.5% > 40%"),
    ({"resource": "memory", "stall": "full", "max_avg10": 20}, True, ""),
    ({"resource": "memory", "stall": "full", "max_avg10": 10}, False, "pressure memory full: avg10 12% > 10%"),
    ({"resource": "memory", "max_avg10": 50, "max_avg60": 10}, False, "pressure memory some: avg60 18.2% > 10%"),
    ({"resource": "cpu", "max_avg10": 80, "max_avg300": 10}, False,
     "pressure cpu some: avg10 85% > 80%, avg300 20% > 10%"),
    ({"resource": "io", "max_avg10": 10, "max_avg60": 10}, True, ""),
])
async def test_pressure_thresholds(keys: dict, ok: bool, reason: str) -> None:
    """pressure fails when any configured average of the chosen line exceeds its bound."""
    r = await sample(check(type="pressure", **keys), Context(proc=BUSY))
    assert (r.ok, r.reason) == (ok, reason)
    assert r.observation.unit == "percent"


async def test_pressure_without_psi_fails_clearly(tmp_path: Path) -> None:
    """On a kernel without /proc/pressure the check fails saying so, and validate's preflight warns."""
    cfg = check(type="pressure", resource="io", max_avg10=10)
    r = await sample(cfg, Context(proc=tmp_path))
    assert not r.ok and r.kind == "unsupported"
    assert r.reason.startswith(f"pressure: this kernel has no PSI ({tmp_path}/pressure/io missing")
    assert cfg.preflight(tmp_path) == (f"this kernel has no PSI ({tmp_path}/pressure/io missing): "
                                       "the check will fail on this host",)
    assert cfg.preflight(BUSY) == ()


@pytest.mark.parametrize("proc, bound, ok, reason", [
    (BUSY, 90, False, "fds: 2300000 of 2466170 file handles in use (93.3%) > 90% of fs.file-max"),
    (BUSY, 95, True, ""),
    (IDLE, 50, True, ""),
])
async def test_fds_system_thresholds(proc: Path, bound: float, ok: bool, reason: str) -> None:
    """fds without a process compares handles in use with fs.file-max."""
    r = await sample(check(type="fds", max_used_percent=bound), Context(proc=proc))
    assert (r.ok, r.reason) == (ok, reason)


@pytest.mark.parametrize("keys, ok, reason", [
    ({"process_name": "app-server", "max_used_percent": 90}, False,
     "fds app-server: pid 4194000 has 60 of 64 fds open (93.8%) > 90% of RLIMIT_NOFILE"),
    ({"cmdline": r"app-server --port 8080$", "max_used_percent": 95}, True, ""),
    ({"process_name": "nginx"}, False, "fds nginx: no such process running"),
])
async def test_fds_process_thresholds(tmp_path: Path, keys: dict, ok: bool, reason: str) -> None:
    """fds for a process compares its open fds with its soft RLIMIT_NOFILE."""
    proc = proc_copy("busy", tmp_path)
    (proc / "4194000" / "fd").mkdir()
    for fd in range(60):
        (proc / "4194000" / "fd" / str(fd)).touch()
    r = await sample(check(type="fds", **keys), Context(proc=proc))
    assert (r.ok, r.reason) == (ok, reason)


@pytest.mark.parametrize("bound, ok, reason", [
    (95, True, ""),
    (90, False, "cpu: 92.0% busy > 90% (over"),
])
async def test_cpu_thresholds(tmp_path: Path, bound: float, ok: bool, reason: str) -> None:
    """cpu counts steal as busy, iowait as idle and guest time once, between two recorded /proc/stat."""
    ctx = Context(proc=tmp_path)
    cfg = check(type="cpu", max_percent=bound, timeout=0.1, interval=1)
    shutil.copy(IDLE / "stat", tmp_path / "stat")
    first = await sample(cfg, ctx)
    assert (first.ok, first.reason) == (False, "cpu: /proc/stat did not advance between samples")
    shutil.copy(BUSY / "stat", tmp_path / "stat")  # 10 s later: 2000 jiffies on 2 CPUs
    r = await sample(cfg, ctx)
    assert r.ok == ok and r.reason.startswith(reason)
    assert r.observation.value == 92.0
    assert dict((n, v) for n, v, _ in r.observation.values) == {"iowait": 3.0, "steal": 5.0}
    shutil.copy(IDLE / "stat", tmp_path / "stat")
    back = await sample(cfg, ctx)
    assert (back.ok, back.reason) == (False, "cpu: /proc/stat counters went backwards; measuring again")


async def test_cpu_window_averages_over_older_samples(tmp_path: Path) -> None:
    """With a window, utilisation is measured from the newest sample at least that old."""
    ctx = Context(proc=tmp_path)
    cfg = check(type="cpu", max_percent=100, window=1, interval=1, timeout=0.1)
    shutil.copy(IDLE / "stat", tmp_path / "stat")
    await sample(cfg, ctx)
    shutil.copy(BUSY / "stat", tmp_path / "stat")
    r1 = await sample(cfg, ctx)
    r2 = await sample(cfg, ctx)  # no new jiffies, but the window still reaches back to the idle reading
    assert r1.observation.value == r2.observation.value == 92.0


async def test_values_reach_status_and_metrics(start_agent) -> None:
    """A running agent shows each node check's value and unit in /status and as healthgate_check_value."""
    config = {"checks": [
        {"name": "load", "type": "load", "max_per_cpu": 1000, "interval": "200ms", "timeout": "100ms", "rise": 1},
        {"name": "swap", "type": "swap", "max_used_percent": 100, "interval": "200ms", "timeout": "100ms", "rise": 1},
    ]}
    agent = await start_agent(config)

    async def sampled() -> bool:
        return all(s.last is not None and s.last.ok for s in agent.state.states.values())

    await async_wait_for(sampled, timeout=5, what="both checks sampled")
    _, body = await agent.get("/status")
    load = json.loads(body)["checks"]["load:load"][0]
    assert load["observedUnit"] == "per_cpu" and load["observedValue"] >= 0
    assert load["threshold"] == "load1 per CPU <= 1000"
    _, metrics = await agent.get("/metrics")
    assert 'healthgate_check_value{check="load",series="value",unit="per_cpu"}' in metrics
    assert 'healthgate_check_value{check="load",series="cpus",unit=""}' in metrics
    assert 'healthgate_check_value{check="swap",series="value",unit="percent"}' in metrics

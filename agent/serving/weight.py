"""Capacity weight for HAProxy's agent-check: load headroom, EWMA-smoothed, floored, ramped after a recovery."""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path

from agent import logs
from agent.model import Admin
from agent.probes.blocking import StillBlocked, off_loop
from agent.probes.procfs import CpuTimes, parse_loadavg, parse_pressure, parse_stat
from agent.state import AgentState

SAMPLE_EVERY = 1.0  # seconds between /proc readings
TICK = 0.2  # seconds between looks at the verdict (recovery detection for the slow start)
READ_TIMEOUT = 1.0  # a /proc read that takes longer is abandoned for this round


# -- reading /proc, with the probes' parsers -----------------------------------------------------

@dataclass(frozen=True, slots=True)
class Reading:
    """The raw load counters at one instant; which fields are set depends on the source."""

    busy: float | None = None  # cpu: jiffies not idle, summed over all CPUs since boot
    total: float | None = None  # cpu: all jiffies
    load1: float | None = None  # load: 1-minute load average
    cpus: int | None = None  # load: number of CPUs
    pressure: float | None = None  # pressure: PSI cpu "some avg10", percent


def _cpu(proc: Path) -> tuple[CpuTimes, int]:
    """/proc/stat's aggregate times and CPU count (at least 1); ValueError without a usable `cpu ` line."""
    times, cpus = parse_stat((proc / "stat").read_text())
    if times is None or times.total <= 0:
        raise ValueError("no aggregate cpu line in /proc/stat")
    return times, max(cpus, 1)


def read_load(proc: Path, source: str) -> Reading:
    """One reading for `source` (blocking file reads: call it in a thread)."""
    if source == "cpu":
        times, _ = _cpu(proc)
        return Reading(busy=float(times.busy), total=float(times.total))
    if source == "load":
        _, cpus = _cpu(proc)
        return Reading(load1=parse_loadavg((proc / "loadavg").read_text())[0], cpus=cpus)
    if source == "pressure":
        some = parse_pressure((proc / "pressure" / "cpu").read_text()).get("some", {})
        if "avg10" not in some:
            raise ValueError("no 'some avg10=' in /proc/pressure/cpu")
        return Reading(pressure=some["avg10"])
    raise ValueError(f"unknown weight source {source!r}")


# -- the pure math ---------------------------------------------------------------------------------

def headroom(source: str, prev: Reading | None, cur: Reading) -> float | None:
    """Spare capacity in [0, 1] (1 = idle); None when this reading alone can't tell (cpu needs two)."""
    if source == "cpu":
        if prev is None or prev.total is None or prev.busy is None or cur.total is None or cur.busy is None:
            return None
        dt = cur.total - prev.total
        if dt <= 0:
            return None
        used = (cur.busy - prev.busy) / dt
    elif source == "load" and cur.load1 is not None and cur.cpus:
        used = cur.load1 / cur.cpus
    elif source == "pressure" and cur.pressure is not None:
        used = cur.pressure / 100.0
    else:
        return None
    return min(1.0, max(0.0, 1.0 - used))


@dataclass(frozen=True, slots=True)
class WeightState:
    smoothed: float | None = None  # EWMA of headroom, 0..1; None until the first usable reading
    sampled_at: float | None = None  # monotonic time of the last reading folded in
    serving_since: float | None = None  # monotonic time the node last became able to serve; None while not


def smooth(state: WeightState, value: float, now: float, tau: float) -> WeightState:
    """Fold one headroom reading into the EWMA. Time-based: the weight of the old value decays as e^(-dt/tau)."""
    if state.smoothed is None or state.sampled_at is None or tau <= 0:
        return replace(state, smoothed=value, sampled_at=now)
    alpha = 1.0 - math.exp(-max(0.0, now - state.sampled_at) / tau)
    return replace(state, smoothed=state.smoothed + alpha * (value - state.smoothed), sampled_at=now)


def track(state: WeightState, serving: bool, now: float) -> WeightState:
    """Remember when the node last became able to serve: the slow start counts from there."""
    if serving and state.serving_since is None:
        return replace(state, serving_since=now)
    if not serving and state.serving_since is not None:
        return replace(state, serving_since=None)
    return state


def capacity_weight(state: WeightState, now: float, *, source: str, floor: int, slow_start: float) -> int:
    """The weight in percent (1-100) to advertise.

    `off` is always 100. Otherwise the smoothed headroom (100 while nothing is measured yet) is held
    at or above `floor`, so load alone never takes the node to 0%: going down for overload is the
    node-load checks' job. For `slow_start` after the node became able to serve, the weight ramps
    linearly from `floor` to that value.
    """
    if source == "off":
        return 100
    target = 100.0 if state.smoothed is None else 100.0 * state.smoothed
    target = min(100.0, max(float(floor), target))
    if state.serving_since is None:
        progress = 0.0  # just came up and the tick hasn't noticed yet: start at the floor
    elif slow_start <= 0:
        progress = 1.0
    else:
        progress = min(1.0, max(0.0, (now - state.serving_since) / slow_start))
    return max(1, min(100, round(floor + (target - floor) * progress)))


# -- the task that keeps the weight current ----------------------------------------------------------

class WeightTracker:
    """Samples load in its own task; the agent-check reply only calls `weight()`, which reads no file.

    Invariant: only `run()` (one task) writes `model`; readers on the same loop see a whole value.
    """

    def __init__(self, state: AgentState, proc: Path):
        self.state = state
        self.proc = proc
        self.model = WeightState()
        self._reading: Reading | None = None
        self._source: str | None = None
        self._error = ""
        # off_loop's slot for the /proc read: its own thread, never the default executor, where a hung
        # resolver may hold every worker.
        self._slots: dict[str, object] = {}

    def weight(self, now: float) -> int:
        cfg = self.state.config.agent_check
        return capacity_weight(self.model, now, source=cfg.weight_source, floor=cfg.weight_floor,
                               slow_start=cfg.slow_start)

    def observe(self, now: float) -> None:
        """Note whether the node can serve now: verdict up, and neither drained nor in maintenance. Coming
        back from any of the three ramps the weight from the floor: a drained node's caches and pools went
        cold too, and HAProxy sent it no new sessions."""
        answer = self.state.answer(now)
        self.model = track(self.model, answer.healthy and answer.admin is Admin.READY, now)

    async def sample(self) -> None:
        cfg = self.state.config.agent_check
        source = cfg.weight_source
        if source != self._source:  # a reload changed the source: earlier readings mean something else
            self._source, self._reading = source, None
            self.model = replace(self.model, smoothed=None, sampled_at=None)
        if source == "off":
            return
        loop = asyncio.get_running_loop()
        try:
            try:
                async with asyncio.timeout(READ_TIMEOUT):
                    reading = await off_loop(self._slots, "read", read_load, self.proc, source, name="weight")
            except TimeoutError:
                raise TimeoutError(f"reading {self.proc} took over {READ_TIMEOUT:g}s") from None
        except StillBlocked:
            return  # the last read is stuck in its thread: never start a second one beside it
        except (OSError, ValueError, IndexError, ZeroDivisionError, TimeoutError) as e:
            # The weight keeps its last value (100 if there never was one); the verdict is not touched.
            error = f"{type(e).__name__}: {e}"
            if error != self._error:
                logs.event("weight_source_unavailable", logging.WARNING, source=source, error=error)
                self._error = error
            return
        if self._error:
            logs.event("weight_source_recovered", source=source)
            self._error = ""
        value = headroom(source, self._reading, reading)
        self._reading = reading
        if value is not None:
            self.model = smooth(self.model, value, loop.time(), cfg.weight_smoothing)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        next_sample = loop.time()
        while True:
            try:
                now = loop.time()
                self.observe(now)
                if now >= next_sample:
                    next_sample = now + SAMPLE_EVERY
                    await self.sample()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # one bad round must not end the loop: the weight just stays put
                logs.event("weight_loop_error", logging.ERROR, error=repr(e))
            await asyncio.sleep(TICK)

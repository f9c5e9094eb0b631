"""The capacity weight: /proc parsers, headroom, EWMA, floor and slow-start ramp as tables on an injected clock."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from agent.model import Admin
from agent.probes.procfs import CpuTimes, parse_loadavg, parse_pressure, parse_stat
from agent.serving.haproxy_agent import format_reply
from agent.serving.weight import (
    Reading,
    WeightState,
    capacity_weight,
    headroom,
    read_load,
    smooth,
    track,
)

STAT = """cpu  100 0 100 700 100 0 0 0 0 0
cpu0 50 0 50 350 50 0 0 0 0 0
cpu1 50 0 50 350 50 0 0 0 0 0
intr 1 2 3
"""
PRESSURE = "some avg10=12.50 avg60=3.00 avg300=1.00 total=123\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n"


def test_parsers_read_the_proc_formats() -> None:
    """The probes' parsers the weight reads with: /proc/stat gives busy (idle and iowait excluded), total and
    CPU count; loadavg and PSI their headline."""
    assert parse_stat(STAT) == (CpuTimes(busy=200, total=1000, iowait=100, steal=0), 2)
    assert parse_loadavg("1.50 0.80 0.40 2/300 1234\n")[0] == 1.5
    assert parse_pressure(PRESSURE)["some"]["avg10"] == 12.5


@pytest.mark.parametrize("source, name, text", [
    ("pressure", "pressure/cpu", "full avg10=1.00\n"),
    ("cpu", "stat", "intr 1 2\n"),
    ("load", "stat", "intr 1 2\n"),
])
def test_a_file_without_the_line_the_weight_needs_is_an_error(tmp_path: Path, source: str, name: str,
                                                              text: str) -> None:
    """A PSI file without "some avg10", or a /proc/stat without its aggregate cpu line, is a ValueError."""
    (tmp_path / "pressure").mkdir()
    (tmp_path / "loadavg").write_text("1.00 0.50 0.25 1/100 42\n")
    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError):
        read_load(tmp_path, source)


def test_read_load_uses_the_injected_proc_root(tmp_path: Path) -> None:
    """read_load reads the files of the chosen source under an injectable /proc root."""
    (tmp_path / "pressure").mkdir()
    (tmp_path / "stat").write_text(STAT)
    (tmp_path / "loadavg").write_text("1.00 0.50 0.25 1/100 42\n")
    (tmp_path / "pressure" / "cpu").write_text(PRESSURE)
    assert read_load(tmp_path, "cpu") == Reading(busy=200.0, total=1000.0)
    assert read_load(tmp_path, "load") == Reading(load1=1.0, cpus=2)
    assert read_load(tmp_path, "pressure") == Reading(pressure=12.5)


@pytest.mark.parametrize("source, prev, cur, expected", [
    ("cpu", None, Reading(busy=10, total=100), None),  # cpu needs two readings
    ("cpu", Reading(busy=10, total=100), Reading(busy=10, total=100), None),  # no time passed
    ("cpu", Reading(busy=10, total=100), Reading(busy=40, total=200), 0.7),  # 30% busy
    ("cpu", Reading(busy=0, total=0), Reading(busy=100, total=100), 0.0),  # saturated
    ("load", None, Reading(load1=1.0, cpus=4), 0.75),
    ("load", None, Reading(load1=9.0, cpus=4), 0.0),  # overloaded clamps at 0, never negative
    ("load", None, Reading(load1=0.0, cpus=4), 1.0),
    ("pressure", None, Reading(pressure=12.5), 0.875),
    ("pressure", None, Reading(pressure=100.0), 0.0),
    ("off", None, Reading(), None),
])
def test_headroom(source: str, prev: Reading | None, cur: Reading, expected: float | None) -> None:
    """Headroom is the spare share of capacity, clamped to [0, 1]."""
    got = headroom(source, prev, cur)
    assert got == pytest.approx(expected) if expected is not None else got is None


@pytest.mark.parametrize("steps, tau, expected", [
    ([(0.0, 0.2)], 10.0, 0.2),  # the first reading is taken as is
    ([(0.0, 1.0), (10.0, 0.0)], 10.0, math.exp(-1)),  # after one time constant 1/e of the old value is left
    ([(0.0, 1.0), (1.0, 0.0)], 10.0, math.exp(-0.1)),
    ([(0.0, 1.0), (1.0, 0.0), (2.0, 0.0)], 10.0, math.exp(-0.2)),  # time-based: two 1 s steps = one 2 s step
    ([(0.0, 1.0), (2.0, 0.0)], 10.0, math.exp(-0.2)),
    ([(0.0, 1.0), (1.0, 0.0)], 0.0, 0.0),  # smoothing 0 = raw readings
    ([(0.0, 0.5), (5.0, 0.5), (9.0, 0.5)], 3.0, 0.5),  # a constant stays constant
])
def test_ewma_on_an_injected_clock(steps: list[tuple[float, float]], tau: float, expected: float) -> None:
    """The EWMA decays the old value by e^(-dt/tau), so the result depends on elapsed time, not on call count."""
    state = WeightState()
    for now, value in steps:
        state = smooth(state, value, now, tau)
    assert state.smoothed == pytest.approx(expected)


def serving_at(t: float | None, smoothed: float | None) -> WeightState:
    return WeightState(smoothed=smoothed, sampled_at=0.0, serving_since=t)


@pytest.mark.parametrize("state, now, source, floor, slow_start, expected", [
    (serving_at(0.0, 0.8), 100.0, "cpu", 10, 30.0, 80),  # steady: the headroom
    (serving_at(0.0, 0.0), 100.0, "cpu", 10, 30.0, 10),  # saturated: the floor, never 0
    (serving_at(0.0, 0.0), 100.0, "load", 1, 30.0, 1),  # the lowest floor is still 1%
    (serving_at(0.0, 0.05), 100.0, "cpu", 10, 30.0, 10),
    (serving_at(0.0, None), 100.0, "cpu", 10, 30.0, 100),  # nothing measured yet: full weight
    (serving_at(0.0, 0.3), 100.0, "off", 10, 30.0, 100),  # off: always 100
    (serving_at(None, 0.3), 100.0, "off", 10, 30.0, 100),  # off: no ramp either
    # the slow start: from the floor at the recovery to the computed value after slow_start
    (serving_at(100.0, 0.9), 100.0, "cpu", 10, 30.0, 10),
    (serving_at(100.0, 0.9), 115.0, "cpu", 10, 30.0, 50),
    (serving_at(100.0, 0.9), 130.0, "cpu", 10, 30.0, 90),
    (serving_at(100.0, 0.9), 500.0, "cpu", 10, 30.0, 90),
    (serving_at(100.0, None), 106.0, "pressure", 20, 30.0, 36),
    (serving_at(100.0, 0.9), 100.0, "cpu", 10, 0.0, 90),  # slow_start 0: no ramp
    (serving_at(None, 0.9), 100.0, "cpu", 10, 30.0, 10),  # up but not noticed yet: the floor
    (serving_at(100.0, 0.05), 110.0, "cpu", 10, 30.0, 10),  # below the floor: the ramp never goes under it
])
def test_capacity_weight(state: WeightState, now: float, source: str, floor: int, slow_start: float,
                         expected: int) -> None:
    """The advertised weight: floored headroom, 100 when off, ramped linearly after a recovery."""
    assert capacity_weight(state, now, source=source, floor=floor, slow_start=slow_start) == expected


def test_track_restarts_the_ramp_on_each_recovery() -> None:
    """The slow start counts from the latest time the node became able to serve; going down forgets it."""
    s = track(WeightState(), True, 5.0)
    assert s.serving_since == 5.0
    assert track(s, True, 9.0).serving_since == 5.0
    s = track(s, False, 10.0)
    assert s.serving_since is None
    assert track(s, True, 12.0).serving_since == 12.0


@pytest.mark.parametrize("admin", [Admin.DRAIN, Admin.MAINT])
def test_tracker_ramps_after_drain_and_maintenance_as_after_down(admin: Admin) -> None:
    """Back from drain or maintenance, the tracker ramps the weight from the floor over slow_start, exactly
    as after a recovery from DOWN, instead of jumping back to the headroom it had before."""
    from agent.config import parse_config
    from agent.serving.weight import WeightTracker
    from tests.helpers import PASSING, answer_for

    cfg = parse_config({"agent_check": {"weight_source": "cpu", "weight_floor": 10, "slow_start": 30},
                        "checks": [PASSING]})
    now_answer = {"answer": answer_for(up=True)}
    tracker = WeightTracker(SimpleNamespace(config=cfg, answer=lambda now: now_answer["answer"]), Path("/proc"))
    tracker.model = WeightState(smoothed=0.9, sampled_at=0.0)
    for t0, kind, back in ((0.0, "down", answer_for(up=False)), (1000.0, "admin", answer_for(up=True, admin=admin))):
        now_answer["answer"] = back
        tracker.observe(t0)
        now_answer["answer"] = answer_for(up=True)
        tracker.observe(t0 + 1)
        assert tracker.weight(t0 + 100) == 90  # long in service: the headroom
        now_answer["answer"] = back
        tracker.observe(t0 + 100)
        assert tracker.weight(t0 + 100) == 10, kind
        now_answer["answer"] = answer_for(up=True)
        tracker.observe(t0 + 200)
        assert [tracker.weight(t0 + t) for t in (200, 215, 230)] == [10, 50, 90], kind
        assert format_reply(now_answer["answer"], tracker.weight(t0 + 215)) == "up ready 50%\n", kind

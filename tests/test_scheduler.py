"""The scheduler on its own, with a runner that records when each check was sampled and answers as told:
intervals and their jitter, the quick confirmation of a first failure, and reloads that restart only the
checks they change."""

from __future__ import annotations

import asyncio
import time

import pytest

from agent.config import parse_config
from agent.model import Result
from agent.probes.base import CheckBase, Context
from agent.scheduler import Scheduler
from agent.state import AgentState
from tests.helpers import async_wait_for


class FakeRunner:
    """Records (check, loop time) per sample; `failing` names the checks whose samples fail, `raising` those
    whose samples raise (a bug in the runner, which never raises by contract)."""

    def __init__(self) -> None:
        self.samples: list[tuple[str, float]] = []
        self.failing: set[str] = set()
        self.raising: set[str] = set()
        self.hung: dict = {}
        self.ctx = Context()

    async def run(self, check: CheckBase) -> Result:
        now = asyncio.get_running_loop().time()
        self.samples.append((check.name, now))
        if check.name in self.raising:
            raise RuntimeError("a bug in the runner")
        ok = check.name not in self.failing
        return Result(ok=ok, reason="" if ok else "told to fail", kind="ok" if ok else "error", duration=0.0,
                      started=now, finished=now, wall=time.time())

    def times(self, name: str) -> list[float]:
        return [t for n, t in self.samples if n == name]


def config(*checks: dict):
    return parse_config({"checks": [{"type": "memory", "timeout": "10ms", "rise": 1, "max_used_percent": 100, **c}
                                    for c in checks]})


async def running(cfg) -> tuple[Scheduler, FakeRunner, asyncio.Task]:
    state = AgentState(cfg, asyncio.get_running_loop().time())
    runner = FakeRunner()
    scheduler = Scheduler(state, runner)  # type: ignore[arg-type]
    return scheduler, runner, asyncio.create_task(scheduler.run())


async def stop(task: asyncio.Task) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def _enough(runner: FakeRunner, name: str, n: int) -> bool:
    return len(runner.times(name)) >= n


async def test_samples_follow_the_interval_within_its_jitter() -> None:
    """Each check is sampled every interval, moved by at most +-jitter of it (and moved: the gaps differ);
    without jitter every gap is the interval; `ready` is set once every check has reported."""
    cfg = config({"name": "a", "interval": "100ms", "jitter": 0.2}, {"name": "b", "interval": "250ms", "jitter": 0})
    scheduler, runner, task = await running(cfg)
    try:
        await async_wait_for(lambda: _enough(runner, "b", 6), timeout=5, what="six samples of b")
    finally:
        await stop(task)
    a, b = runner.times("a"), runner.times("b")
    gaps_a = [y - x for x, y in zip(a, a[1:], strict=False)]
    gaps_b = [y - x for x, y in zip(b, b[1:], strict=False)]
    assert all(0.08 - 0.005 <= g <= 0.12 + 0.05 for g in gaps_a), gaps_a  # 100 ms +- 20%, plus loop slack
    assert all(0.25 - 0.005 <= g <= 0.25 + 0.05 for g in gaps_b), gaps_b
    assert max(gaps_a) - min(gaps_a) > 0.01, gaps_a  # +-20 ms drawn ~15 times: the jitter is in effect
    assert scheduler.ready.is_set()


async def test_first_samples_are_spread_over_a_tenth_of_the_interval() -> None:
    """The first samples of many checks start spread out, not in one burst, and all within a tenth of the
    interval (the jitter's share of it) of the start."""
    n = 20
    cfg = config(*({"name": f"c{i}", "interval": "1s", "jitter": 0.1} for i in range(n)))
    t0 = asyncio.get_running_loop().time()
    scheduler, runner, task = await running(cfg)
    try:
        await asyncio.wait_for(scheduler.ready.wait(), timeout=5)
    finally:
        await stop(task)
    firsts = [runner.times(f"c{i}")[0] for i in range(n)]
    assert max(firsts) - t0 <= 0.1 + 0.05, [round(t - t0, 3) for t in firsts]  # plus loop slack
    assert max(firsts) - min(firsts) > 0.02, [round(t - t0, 3) for t in firsts]  # 20 draws over 100 ms


async def test_a_runner_that_raises_does_not_end_the_loop() -> None:
    """A sample that raises (which the runner never should) is logged and the check sampled again at its
    interval; its other checks go on, and it reports again once the runner answers."""
    cfg = config({"name": "a", "interval": "50ms", "jitter": 0}, {"name": "b", "interval": "50ms", "jitter": 0})
    scheduler, runner, task = await running(cfg)
    runner.raising.add("a")
    try:
        await async_wait_for(lambda: _enough(runner, "a", 4), timeout=5, what="a sampled again after raising")
        assert scheduler.state.states["a"].last is None  # nothing recorded: the check goes stale, and fails
        assert scheduler.state.states["b"].last is not None
        runner.raising.clear()

        async def a_reported() -> bool:
            return scheduler.state.states["a"].last is not None

        await async_wait_for(a_reported, timeout=5, what="a result for a once the runner answers")
    finally:
        await stop(task)
    a = runner.times("a")
    gaps = [y - x for x, y in zip(a, a[1:], strict=False)]
    assert all(g >= 0.05 - 0.005 for g in gaps), gaps  # at its interval: no busy loop on the error


async def test_a_first_failure_is_confirmed_at_the_fast_interval_then_the_interval_resumes() -> None:
    """After a first failure the next fall - 1 samples come at fast_interval; once the failure is confirmed
    the check is sampled at its interval again."""
    cfg = config({"name": "a", "interval": "500ms", "fast_interval": "50ms", "jitter": 0, "fall": 3})
    scheduler, runner, task = await running(cfg)
    try:
        await async_wait_for(lambda: _enough(runner, "a", 1), what="a first sample")
        runner.failing.add("a")
        start = len(runner.times("a"))
        await async_wait_for(lambda: _enough(runner, "a", start + 5), timeout=5, what="samples while failing")
    finally:
        await stop(task)
    t = runner.times("a")[start - 1:]
    gaps = [y - x for x, y in zip(t, t[1:], strict=False)]
    # The sample that fails first waits the normal interval; the next two (fall - 1 unconfirmed) come fast;
    # once confirmed (3 in a row) the interval resumes.
    assert gaps[0] >= 0.45, gaps
    assert all(g < 0.2 for g in gaps[1:3]), gaps
    assert all(g >= 0.45 for g in gaps[3:]), gaps


async def test_a_reload_restarts_only_the_checks_it_changes() -> None:
    """A reload restarts the loops of changed checks, starts added ones and stops removed ones (never
    sampled again), and leaves an unchanged check's loop running as it was."""
    cfg = config({"name": "kept", "interval": "50ms"}, {"name": "changed", "interval": "50ms"},
                 {"name": "removed", "interval": "50ms"})
    scheduler, runner, task = await running(cfg)
    try:
        await async_wait_for(lambda: _enough(runner, "removed", 2), what="every check sampled")
        loops = dict(scheduler.loops)
        new = config({"name": "kept", "interval": "50ms"}, {"name": "changed", "interval": "60ms"},
                     {"name": "added", "interval": "50ms"})
        changed = scheduler.state.apply_config(new, asyncio.get_running_loop().time())
        assert changed == {"changed", "added"}
        scheduler.reload(changed)
        assert scheduler.loops["kept"] is loops["kept"]  # the same task: its rhythm and state go on
        assert scheduler.loops["changed"] is not loops["changed"]
        assert "removed" not in scheduler.loops and loops["removed"].cancelling()
        await async_wait_for(lambda: _enough(runner, "added", 2), what="the added check sampled")
        removed, kept = len(runner.times("removed")), len(runner.times("kept"))
        await async_wait_for(lambda: _enough(runner, "kept", kept + 3), what="more samples")
        assert len(runner.times("removed")) == removed  # the removed check is never sampled again
    finally:
        await stop(task)


async def test_the_heartbeat_beats_on_its_period_and_stops_with_the_scheduler() -> None:
    """The heartbeat ticks the state every beat (100 ms for the default lag limit), each tick a fresh
    heartbeat; once the scheduler is cancelled no beat runs again (the next timer is cancelled, not left
    to tick a state nobody serves)."""
    cfg = config({"name": "a", "interval": "1h"})
    scheduler, _, task = await running(cfg)
    beats: list[float] = []
    scheduler.on_beat = beats.append
    await async_wait_for(lambda: _at_least(beats, 6), timeout=5, what="six beats")
    await stop(task)
    gaps = [y - x for x, y in zip(beats, beats[1:], strict=False)]
    assert all(0.1 - 0.005 <= g <= 0.1 + 0.05 for g in gaps), gaps
    assert scheduler.state.heartbeat == beats[-1]
    stopped_at = len(beats)
    await asyncio.sleep(0.3)  # three periods: a beat left scheduled would have run by now
    assert len(beats) == stopped_at


async def test_a_beat_that_raises_ends_the_scheduler_with_its_error() -> None:
    """A bug in a beat (here the on_beat hook) is not swallowed by the loop's exception handler while the
    heartbeat silently stops: the scheduler ends with the error, as the agent's supervision expects."""
    cfg = config({"name": "a", "interval": "1h"})
    scheduler, _, task = await running(cfg)

    def broken(now: float) -> None:
        raise RuntimeError("a bug in a beat")

    scheduler.on_beat = broken
    with pytest.raises(ExceptionGroup) as err:
        await asyncio.wait_for(task, 5)
    assert err.group_contains(RuntimeError, match="a bug in a beat")


async def _at_least(items: list, n: int) -> bool:
    return len(items) >= n


async def test_a_beat_raising_stopiteration_still_ends_the_scheduler() -> None:
    """A StopIteration out of a beat (a stray next()) ends the scheduler with a RuntimeError, as the sleeping
    coroutine did (PEP 479), instead of escaping the timer callback into the loop's handler and leaving the
    heartbeat dead and the agent running, DOWN for good with nothing to restart it."""
    cfg = config({"name": "a", "interval": "1h"})
    scheduler, _, task = await running(cfg)

    def broken(now: float) -> None:
        next(iter(()))

    scheduler.on_beat = broken
    with pytest.raises(ExceptionGroup) as err:
        await asyncio.wait_for(task, 5)
    assert err.group_contains(RuntimeError, match="StopIteration")


async def test_a_recheck_cuts_a_passing_checks_wait_short() -> None:
    """recheck(name) (its held connection was dropped) samples a passing check now instead of an interval
    later; a failing check's wait (its quick confirmation) is left alone, and so is a recheck of a check the
    scheduler does not run."""
    cfg = config({"name": "ok", "interval": "30s", "jitter": 0}, {"name": "bad", "interval": "30s", "jitter": 0,
                                                                   "fast_interval": "10s", "fall": 3})
    scheduler, runner, task = await running(cfg)
    runner.failing.add("bad")
    try:
        await async_wait_for(lambda: _all_once(runner), timeout=5, what="first samples")
        scheduler.recheck("ok")
        scheduler.recheck("bad")
        scheduler.recheck("nonesuch")
        await async_wait_for(lambda: _enough(runner, "ok", 2), timeout=5, what="the re-check of ok")
        await asyncio.sleep(0.1)
        assert len(runner.times("bad")) == 1
        assert len(runner.times("ok")) == 2
    finally:
        await stop(task)


async def _all_once(runner: FakeRunner) -> bool:
    return bool(runner.times("ok")) and bool(runner.times("bad"))


async def test_rechecks_of_many_checks_at_once_are_spread() -> None:
    """A server dropping every held connection at once (a restart, CLIENT KILL) re-checks its checks at
    RECHECK_RATE a second at most, not all in one turn of the loop; each is still re-checked."""
    from agent.scheduler import RECHECK_RATE

    n = 20
    cfg = config(*({"name": f"c{i}", "interval": "60s", "jitter": 0} for i in range(n)))
    scheduler, runner, task = await running(cfg)
    try:
        await async_wait_for(lambda: _each(runner, n, 1), timeout=5, what="first samples")
        for i in range(n):
            scheduler.recheck(f"c{i}")
        await async_wait_for(lambda: _each(runner, n, 2), timeout=5, what="every re-check")
    finally:
        await stop(task)
    second = sorted(runner.times(f"c{i}")[1] for i in range(n))
    assert second[-1] - second[0] >= (n - 1) / RECHECK_RATE * 0.9, second


async def _each(runner: FakeRunner, n: int, count: int) -> bool:
    return all(len(runner.times(f"c{i}")) >= count for i in range(n))

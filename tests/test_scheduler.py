"""The scheduler on its own, with a runner that records when each check was sampled and answers as told:
intervals and their jitter, the quick confirmation of a first failure, and reloads that restart only the
checks they change."""

from __future__ import annotations

import asyncio
import time

import pytest

from agent.config import parse_config
from agent.model import Result
from agent.probes.base import CheckBase
from agent.scheduler import Scheduler
from agent.state import AgentState
from tests.helpers import async_wait_for


class FakeRunner:
    """Records (check, loop time) per sample; `failing` names the checks whose samples fail."""

    def __init__(self) -> None:
        self.samples: list[tuple[str, float]] = []
        self.failing: set[str] = set()
        self.hung: dict = {}

    async def run(self, check: CheckBase) -> Result:
        now = asyncio.get_running_loop().time()
        self.samples.append((check.name, now))
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
    assert scheduler.ready.is_set()


async def test_a_first_failure_is_confirmed_at_the_fast_interval_then_the_interval_resumes() -> None:
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

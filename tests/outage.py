"""The fault drill every dependency test runs: UP, break the real server, DOWN in time, repair, UP again."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from tests.helpers import async_wait_for

# Scheduling noise on a busy 2-core machine (other test processes, thread hops) on top of the bound.
MARGIN = 0.75
RECOVERY_DEADLINE = 10.0


def fast_check(name: str, **keys: Any) -> dict[str, Any]:
    """A check sampled every 200 ms, down after 2 failures, up after 2 passes, no jitter."""
    return {"name": name, "interval": "200ms", "timeout": "150ms", "fall": 2, "rise": 2, "jitter": 0, **keys}


def down_bound(check: dict[str, Any]) -> float:
    """interval x fall + timeout: the longest a broken dependency may keep the node UP."""
    from agent.fields import parse_duration

    return parse_duration(check["interval"]) * check["fall"] + parse_duration(check["timeout"])


async def _health(agent: Any, code: int) -> bool:
    return (await agent.get("/health"))[0] == code


def drill(*checks: dict[str, Any]) -> dict[str, Any]:
    """An agent config for outage drills: flap damping off, so repeated drills don't hold a check down."""
    return {"checks": list(checks), "policy": {"flap_threshold": 0}}


async def wait_up(agent: Any, timeout: float = RECOVERY_DEADLINE) -> float:
    t0 = time.monotonic()
    deadline = t0 + timeout
    while not await _health(agent, 200):
        assert time.monotonic() < deadline, f"not UP after {timeout} s: {agent.state.snapshot.verdict.reason}"
        await asyncio.sleep(0.02)
    return time.monotonic() - t0


async def outage(agent: Any, check: dict[str, Any], breaks: Callable[[], Any], repairs: Callable[[], Any],
                 reason: str) -> tuple[float, float]:
    """Break the dependency, assert DOWN within the bound for `reason`, repair, assert UP; (down_s, up_s).

    `breaks` and `repairs` are blocking (they drive real servers), so they run in a thread: the agent
    shares this event loop and must not see them as loop lag.
    """
    await wait_up(agent)
    await asyncio.to_thread(breaks)
    t0 = time.monotonic()
    bound = down_bound(check) + MARGIN
    await async_wait_for(lambda: _health(agent, 503), timeout=bound + 5, interval=0.01, what="DOWN")
    down = time.monotonic() - t0
    verdict = agent.state.snapshot.verdict.reason
    assert verdict.startswith(f"{check['name']}: ") and reason in verdict, verdict
    assert down <= bound, f"DOWN after {down:.2f} s > {bound:.2f} s ({verdict})"
    await asyncio.to_thread(repairs)
    up = await wait_up(agent)
    print(f"outage {check['name']} ({reason}): DOWN after {down:.2f} s (bound {bound:.2f} s), UP {up:.2f} s "
          "after the repair")  # shown with pytest -s: the numbers behind the bound
    return down, up

"""Misbehaving dependencies as a load balancer sees them: /health over time while a dependency dies,
hangs, answers slowly, answers garbage or flaps."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import pytest

from tests.faulty import TcpDependency
from tests.helpers import async_wait_for

INTERVAL, TIMEOUT, RISE, FALL, JITTER = 0.2, 0.1, 2, 2, 0.1
DOWN_BOUND = FALL * INTERVAL * (1 + JITTER) + TIMEOUT  # docs/failure-modes.md's formula for "within"
UP_BOUND = RISE * INTERVAL * (1 + JITTER) + TIMEOUT
MARGIN = 0.5  # polling period, loop scheduling and a shared 2-core machine


def check(name: str, **kw) -> dict:
    return {"name": name, "interval": INTERVAL, "timeout": TIMEOUT, "rise": RISE, "fall": FALL,
            "jitter": JITTER, **kw}


@dataclass
class Poller:
    """Polls /health every 20 ms like an impatient load balancer and keeps (time, status)."""

    agent: object
    seen: list[tuple[float, int]] = field(default_factory=list)
    task: asyncio.Task | None = None

    def start(self) -> Poller:
        self.task = asyncio.create_task(self._run())
        return self

    async def _run(self) -> None:
        while True:
            code = (await self.agent.get("/health"))[0]
            self.seen.append((time.monotonic(), code))
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)

    async def until(self, code: int, after: float, timeout: float = 10.0) -> float:
        """Seconds from `after` to the first `code` seen at or after it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for t, c in self.seen:
                if t >= after and c == code:
                    return t - after
            await asyncio.sleep(0.01)
        pytest.fail(f"/health never answered {code} within {timeout}s; seen {self.codes(after)}")

    def codes(self, since: float = 0.0) -> list[int]:
        return [c for t, c in self.seen if t >= since]

    def transitions(self, since: float = 0.0) -> int:
        codes = self.codes(since)
        return sum(1 for a, b in zip(codes, codes[1:], strict=False) if a != b)


async def up_with(start_agent, dep_check: dict) -> tuple[object, Poller]:
    agent = await start_agent({"checks": [dep_check]})
    poller = Poller(agent).start()
    await poller.until(200, after=0.0, timeout=5)
    return agent, poller


async def test_dependency_that_dies_and_comes_back(start_agent) -> None:
    """A dependency that dies turns /health 503 within fall x interval x (1+jitter) + timeout, once, and
    its return turns it 200 within rise x interval x (1+jitter) + timeout, once."""
    dep = await TcpDependency().start()
    agent, poller = await up_with(start_agent, check("db", type="tcp", port=dep.port))
    try:
        killed = time.monotonic()
        await dep.kill()
        down = await poller.until(503, after=killed)
        assert (FALL - 1) * INTERVAL * (1 - JITTER) - 0.05 <= down <= DOWN_BOUND + MARGIN, down
        refused = f"db: tcp 127.0.0.1:{dep.port}: connection refused"

        async def says_refused() -> bool:
            return agent.state.snapshot.verdict.reason == refused

        await async_wait_for(says_refused, timeout=5, what="the verdict's reason")
        # A second down (an observation window, not a synchronisation): the transitions counted below
        # show /health stays 503 through it.
        await asyncio.sleep(max(0.0, killed + down + 1.0 - time.monotonic()))
        assert agent.state.snapshot.verdict.reason == refused
        revived = time.monotonic()
        await dep.revive()
        up = await poller.until(200, after=revived)
        assert (RISE - 1) * INTERVAL * (1 - JITTER) - 0.05 <= up <= UP_BOUND + MARGIN, up
        await asyncio.sleep(0.5)  # an observation window: /health must stay 200 through it
        assert poller.codes(killed)[-1] == 200
        assert poller.transitions(killed) == 2  # one down, one up: no toggling on the way
    finally:
        await poller.stop()
        await dep.kill()


@pytest.mark.parametrize("mode, delay, reason", [
    ("hang", 0.0, "timeout after 100 ms"),  # accepts TCP and never answers
    ("slow", 0.3, "timeout after 100 ms"),  # answers, but after the timeout
    ("garbage", 0.0, "http: "),  # answers bytes that are not HTTP
])
async def test_misbehaving_http_dependency(start_agent, mode: str, delay: float, reason: str) -> None:
    """A dependency that hangs, answers too slowly or answers garbage is DOWN within the same bound as a
    dead one, with a reason that says which, and /health never toggles while it misbehaves."""
    dep = await TcpDependency().start()
    url = f"http://127.0.0.1:{dep.port}/"
    agent, poller = await up_with(start_agent, check("api", type="http", url=url))
    try:
        t0 = time.monotonic()
        dep.mode, dep.delay = mode, delay
        down = await poller.until(503, after=t0)
        assert down <= DOWN_BOUND + MARGIN, down
        await asyncio.sleep(1.0)  # an observation window: /health must stay 503 through it
        assert set(poller.codes(t0 + down)) == {503}
        last = agent.state.states["api"].last
        assert last.reason.startswith(reason), last.reason
        assert last.duration < TIMEOUT + 0.05  # the runner's timeout bounds every sample
    finally:
        await poller.stop()
        await dep.kill()


async def test_slow_but_in_time_dependency_stays_up(start_agent) -> None:
    """A dependency that answers slowly but within the timeout keeps the node UP without a blip."""
    dep = await TcpDependency("slow", delay=0.03).start()
    agent, poller = await up_with(start_agent, check("api", type="http", url=f"http://127.0.0.1:{dep.port}/"))
    try:
        t0 = time.monotonic()
        await asyncio.sleep(1.5)  # an observation window: /health must stay 200 through it
        assert set(poller.codes(t0)) == {200}
        assert agent.state.states["api"].last.duration >= 0.03
    finally:
        await poller.stop()
        await dep.kill()


FLAP = {"flap_threshold": 2, "flap_window": "60s", "flap_hold": "6s"}


async def flapping(dep: TcpDependency, hz: float, stop: asyncio.Event) -> None:
    half = 1 / (2 * hz)
    loop = asyncio.get_running_loop()
    due = loop.time()
    while not stop.is_set():  # down first, then a toggle every half period
        await asyncio.sleep(max(0.0, due - loop.time()))
        due += half
        if dep.alive:
            await dep.kill()
        else:
            await dep.revive()


async def test_flapping_dependency_keeps_the_node_down(start_agent) -> None:
    """A dependency flapping at 0.2, 1 or 5 Hz moves /health at most 2 x flap_threshold times, then holds
    it at 503; with damping off the same 1 Hz flapping toggles the node every half period."""
    duration = 11.0
    cases = [(hz, FLAP) for hz in (0.2, 1.0, 5.0)] + [(1.0, {"flap_threshold": 0})]
    deps, agents, pollers = [], [], []
    stop = asyncio.Event()
    for _hz, policy in cases:
        dep = await TcpDependency().start()
        agent = await start_agent({"checks": [check("db", type="tcp", port=dep.port, timeout=0.05,
                                                    interval=0.1)], "policy": policy})
        deps.append(dep)
        agents.append(agent)
    try:
        # Every agent up first, then all dependencies start flapping together.
        pollers = [Poller(a).start() for a in agents]
        for p in pollers:
            await p.until(200, after=0.0, timeout=5)
        t0 = time.monotonic()
        flappers = [asyncio.create_task(flapping(d, hz, stop)) for d, (hz, _) in zip(deps, cases, strict=True)]
        await asyncio.sleep(duration)  # how long the dependencies flap, not a synchronisation
        stop.set()
        await asyncio.gather(*flappers)
    finally:
        for p in pollers:
            await p.stop()
        for d in deps:
            await d.kill()

    for (hz, policy), p, agent in zip(cases, pollers, agents, strict=True):
        transitions = p.transitions(t0)
        if policy.get("flap_threshold"):
            assert transitions <= 2 * FLAP["flap_threshold"], (hz, transitions)
            tail = p.codes(t0 + duration - 3.0)
            assert set(tail) == {503}, (hz, tail)  # held down, not toggling
            assert agent.state.states["db"].required_rise is not None or transitions == 0, hz
        else:
            # Undamped: the node follows the dependency, but never faster than it flaps.
            assert 2 * FLAP["flap_threshold"] < transitions <= 2 * hz * duration + 1, (hz, transitions)

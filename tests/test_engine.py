"""The engine against misbehaving checks: hangs, raises, exactly-at-timeout, cancellation-deaf probes."""

from __future__ import annotations

import asyncio
import time
import types

import pytest
from aiohttp import web

from agent.model import Observation, Status
from agent.probes import PROBES
from agent.probes.base import Context
from agent.runner import Runner
from agent.serving import decision as serving
from tests.helpers import async_wait_for


@pytest.fixture
async def blackhole():
    """A TCP server that accepts connections and never answers."""
    held: list[asyncio.StreamWriter] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    for w in held:
        w.close()
    server.close()
    await server.wait_closed()


@pytest.fixture
async def upstream():
    """An aiohttp server: /ok answers at once, /slow?s=N answers after N seconds."""

    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(float(request.query["s"]))
        return web.Response(text="late")

    app = web.Application()
    app.router.add_get("/ok", ok)
    app.router.add_get("/slow", slow)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
    await runner.cleanup()


def raising_module() -> types.ModuleType:
    mod = types.ModuleType("raising")
    mod.Config = PROBES["memory"].Config

    async def probe(cfg, ctx):
        raise RuntimeError("probe exploded")

    mod.probe = probe
    return mod


def check(name: str, **kw) -> dict:
    return {"name": name, "interval": "300ms", "timeout": "200ms", "rise": 1, "fall": 1, **kw}


async def test_misbehaving_checks_are_contained(start_agent, blackhole, upstream) -> None:
    """A hung, a raising and an exactly-at-timeout check fail with their reasons; the rest is unaffected."""
    config = {"checks": [
        check("good", type="http", url=f"{upstream}/ok"),
        check("hang", type="http", url=f"http://127.0.0.1:{blackhole}/", critical=False),
        check("raise", type="memory", critical=False),
        check("exact", type="http", url=f"{upstream}/slow?s=0.2", critical=False),
    ]}
    agent = await start_agent(config, probes={**PROBES, "memory": raising_module()})
    state = agent.state

    await async_wait_for(lambda: _ready(state), timeout=5, what="every check sampled twice")
    worst = 0.0
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        t0 = time.monotonic()
        code, body = await agent.get("/health")
        worst = max(worst, time.monotonic() - t0)
        assert (code, body) == (200, "up\n")
        await asyncio.sleep(0.01)
    assert worst < 0.05, f"/health took {worst * 1000:.1f} ms"

    states = state.states
    assert states["good"].status is Status.UP
    assert states["good"].consecutive_fail == 0
    assert states["hang"].status is Status.DOWN and states["hang"].last.kind == "timeout"
    assert states["hang"].last.reason.startswith("timeout")
    assert states["raise"].last.kind == "error"
    assert states["raise"].last.reason == "error: RuntimeError: probe exploded"
    assert states["exact"].last.kind == "timeout"
    # The hung check's samples keep their schedule: the timeout bounds each one.
    assert states["hang"].last.duration < 0.3


async def _ready(state) -> bool:
    return all(s.last is not None and len(s.history) >= 2 for s in state.states.values())


async def test_critical_hung_check_takes_node_down(start_agent, blackhole) -> None:
    """A hung critical dependency makes the node DOWN with reason `timeout`."""
    agent = await start_agent({"checks": [check("hang", type="http", url=f"http://127.0.0.1:{blackhole}/")]})
    await async_wait_for(lambda: _async(agent.state.states["hang"].last is not None), timeout=5)
    assert (await agent.get("/health"))[0] == 503
    assert agent.state.snapshot.verdict.reason == "hang: timeout after 200 ms"


async def _status(agent, code: int) -> bool:
    return (await agent.get("/health"))[0] == code


async def test_probe_that_ignores_cancellation_is_abandoned() -> None:
    """A probe that swallows cancellation fails with `timeout` and is not started again while it hangs."""
    release = asyncio.Event()
    starts = 0

    async def deaf(cfg, ctx):
        nonlocal starts
        starts += 1
        while not release.is_set():
            try:
                await release.wait()
            except asyncio.CancelledError:
                continue  # deliberately deaf
        raise RuntimeError("finally done")

    mod = types.ModuleType("deaf")
    mod.Config, mod.probe = PROBES["memory"].Config, deaf
    runner = Runner(Context(), {"memory": mod})
    cfg = PROBES["memory"].Config(name="deaf", type="memory", interval=1, timeout=0.05)
    r1 = await runner.run(cfg)
    assert (r1.ok, r1.kind) == (False, "timeout") and r1.duration < 0.2
    r2 = await runner.run(cfg)
    assert r2.kind == "timeout" and "still hung" in r2.reason
    assert starts == 1 and len(runner.hung) == 1
    release.set()
    await async_wait_for(lambda: _async(not runner.hung), timeout=2)


async def _async(v):
    return v


def loop_blocking_module(seconds: float, fails: bool) -> types.ModuleType:
    """A memory probe that blocks the event loop itself for `seconds` (a synchronous call the wait's timer
    cannot interrupt), then passes or raises."""
    mod = types.ModuleType("loop_blocking")
    mod.Config = PROBES["memory"].Config

    async def probe(cfg, ctx):
        time.sleep(seconds)  # noqa: ASYNC251 - the bug under test: a probe that blocks the loop
        if fails:
            raise RuntimeError("late and broken")
        return Observation(value=1.0, detail="answered, eventually")  # no await: done before any timer runs

    mod.probe = probe
    return mod


@pytest.mark.parametrize("fails", [False, True], ids=["then-passes", "then-raises"])
async def test_probe_that_blocks_past_its_timeout_fails_as_timeout(fails: bool) -> None:
    """A probe that blocks the loop past its timeout and then returns fails with kind `timeout`, saying how
    long it took; the same probe within its timeout passes."""
    cfg = PROBES["memory"].Config(name="late", type="memory", interval=1, timeout=0.1, max_used_percent=100)
    r = await Runner(Context(), {"memory": loop_blocking_module(0.3, fails)}).run(cfg)
    assert (r.ok, r.kind) == (False, "timeout"), r
    assert r.reason.startswith("timeout: the sample took ") and r.reason.endswith(" ms, over its 100 ms"), r
    assert r.duration >= 0.3
    quick = await Runner(Context(), {"memory": loop_blocking_module(0.01, False)}).run(cfg)
    assert quick.ok, quick


@pytest.mark.parametrize("returned, reason", [
    (None, "invalid: probe returned NoneType"),
    ("up", "invalid: probe returned str"),
])
async def test_garbage_from_a_probe_is_a_failure(returned, reason) -> None:
    """A probe that returns something other than an Observation fails as `invalid`."""

    async def garbage(cfg, ctx):
        return returned

    mod = types.ModuleType("garbage")
    mod.Config, mod.probe = PROBES["memory"].Config, garbage
    r = await Runner(Context(), {"memory": mod}).run(PROBES["memory"].Config(name="g", type="memory"))
    assert (r.ok, r.kind, r.reason) == (False, "invalid", reason)


async def test_stalled_loop_fails_closed_then_recovers(start_agent) -> None:
    """After the loop is blocked for 2 s, /live and /health answer 503 until the loop is healthy again."""
    agent = await start_agent({"checks": [check("mem", type="memory", max_used_percent=100)],
                               "policy": {"max_loop_lag": "300ms", "loop_recovery": "1s"}})
    await async_wait_for(lambda: _status(agent, 200), timeout=5, what="up")
    assert (await agent.get("/live"))[0] == 200

    time.sleep(2.0)  # noqa: ASYNC251 - the deliberate stall: blocks this event loop, which the agent runs on

    assert (await agent.get("/health"))[0] == 503
    assert (await agent.get("/live"))[0] == 503
    assert "event loop lag" in agent.state.answer(asyncio.get_running_loop().time()).reason
    t0 = time.monotonic()
    await async_wait_for(lambda: _status(agent, 200), timeout=5, what="recovery")
    assert time.monotonic() - t0 >= 0.8  # held down for loop_recovery
    assert (await agent.get("/live"))[0] == 200


def leaking_module(deaf: list[bool]) -> types.ModuleType:
    """A memory probe that also starts five tasks per sample and never awaits them (while deaf[0], those
    tasks ignore cancellation)."""
    mod = types.ModuleType("leaking")
    mod.Config = PROBES["memory"].Config

    async def forgotten() -> None:
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                if not deaf[0]:
                    raise

    async def probe(cfg, ctx):
        for _ in range(5):
            asyncio.create_task(forgotten())  # noqa: RUF006 - the bug under test
        return await PROBES["memory"].probe(cfg, ctx)

    mod.probe = probe
    return mod


@pytest.mark.parametrize("deaf", [False, True], ids=["cancellable", "deaf-to-cancel"])
async def test_probe_that_leaks_tasks_is_bounded(start_agent, upstream, deaf: bool) -> None:
    """A probe that spawns tasks it never awaits fails with `leak` once past the limit, and the agent's
    task count stays bounded (leftovers are cancelled, or the probe is not run again while they live)."""
    from agent.runner import LEAK_LIMIT

    baseline = len(asyncio.all_tasks())
    config = {"checks": [check("good", type="http", url=f"{upstream}/ok", interval="50ms", timeout="40ms"),
                         check("leaky", type="memory", interval="50ms", timeout="40ms", max_used_percent=100)]}
    deafness = [deaf]
    agent = await start_agent(config, probes={**PROBES, "memory": leaking_module(deafness)})
    peak = 0
    deadline = time.monotonic() + 2.0  # ~40 samples: 200 tasks if nothing bounded them
    while time.monotonic() < deadline:
        peak = max(peak, len(asyncio.all_tasks()))
        await asyncio.sleep(0.01)
    leaky, good = agent.state.states["leaky"], agent.state.states["good"]
    assert leaky.status is Status.DOWN and agent.state.snapshot.verdict.failing == ("leaky",)
    assert good.status is Status.UP
    assert peak - baseline <= LEAK_LIMIT + 5 + 20, (peak, baseline)  # + one sample's worth + the agent's own
    assert agent.state.stats["leaky"].failures["leak"] >= 1
    if deaf:  # the leftovers outlived their cancellation, so the probe was not started again
        assert leaky.last.reason.endswith("tasks of earlier samples still running"), leaky.last
    deafness[0] = False
    leftovers = list(agent.agent.runner.spawned["leaky"])
    for t in leftovers:
        t.cancel()
    await asyncio.gather(*leftovers, return_exceptions=True)


async def test_long_waits_ride_on_the_heartbeat_never_late(start_agent) -> None:
    """A check sampled every 1.2 s (no jitter) waits on the heartbeat instead of a timer of its own: each
    sample starts at most one beat before its time and never after it (beyond the loop's own lag)."""
    mem = {"name": "mem", "type": "memory", "interval": "1200ms", "timeout": "100ms", "jitter": 0, "rise": 1,
           "max_used_percent": 100}
    agent = await start_agent({"checks": [mem]})
    scheduler = agent.agent.scheduler
    starts: list[float] = []

    async def sampled() -> bool:
        last = agent.state.states["mem"].last
        if last is not None and (not starts or last.started != starts[-1]):
            starts.append(last.started)
            assert scheduler._riders, "the next sample waits on the heartbeat"
        return len(starts) >= 4

    await async_wait_for(sampled, timeout=10, interval=0.01, what="four samples")
    beat = serving.beat(agent.state.config.policy.max_loop_lag)
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    assert all(1.2 - beat - 0.01 <= g <= 1.2 + 0.05 for g in gaps), gaps


async def test_reloads_leave_no_parked_waits_behind(start_agent) -> None:
    """1,000 reloads restart a check sampled hourly, each loop parked on the heartbeat until its next sample:
    the waits of the cancelled loops do not pile up for the hour they were due in."""
    mem = {"name": "mem", "type": "memory", "interval": "1h", "timeout": "100ms", "jitter": 0, "rise": 1,
           "max_used_percent": 100}
    agent = await start_agent({"checks": [mem]})
    scheduler = agent.agent.scheduler
    await async_wait_for(lambda: _async("mem" in scheduler.loops), what="the check's loop")
    for _ in range(1000):
        task = scheduler.loops["mem"]
        await async_wait_for(lambda: _async(any(not w.done() for _, _, w in scheduler._riders)), timeout=5,
                             interval=0.001, what="the loop parked on the heartbeat")
        scheduler.reload({"mem"})
        await asyncio.gather(task, return_exceptions=True)
    beat = serving.beat(agent.state.config.policy.max_loop_lag)
    await async_wait_for(lambda: _async(len(scheduler._riders) <= 10), timeout=beat * 3 + 5,
                         what="the heartbeats tidying the cancelled loops' waits up")
    assert len(scheduler._riders) <= 10, len(scheduler._riders)


async def test_stop_is_not_held_by_a_loop_that_will_not_end(start_agent, caplog, monkeypatch) -> None:
    """A background loop that does not end when cancelled (its cleanup stuck: a store's close on a dead
    network) holds the agent's stop for STOP_WAIT at most (made 0.5 s here), and is named in the log."""
    import logging

    import agent.app

    monkeypatch.setattr(agent.app, "STOP_WAIT", 0.5)
    STOP_WAIT = 0.5
    caplog.set_level(logging.INFO, logger="healthgate")
    agent = await start_agent({"checks": [{"name": "m", "type": "memory", "interval": "1s"}]})
    release = asyncio.Event()

    async def stubborn() -> None:
        while not release.is_set():
            try:
                await release.wait()
            except asyncio.CancelledError:
                continue  # as a cleanup stuck in its own await would

    task = asyncio.create_task(stubborn(), name="stubborn")
    agent.agent._tasks.append(task)
    t0 = time.monotonic()
    await asyncio.wait_for(agent.agent.stop(), STOP_WAIT + 5)
    assert time.monotonic() - t0 < STOP_WAIT + 2
    assert [r.fields["task"] for r in caplog.records if r.getMessage() == "task_stuck_at_stop"] == ["stubborn"]
    release.set()
    await task

"""run one sample of one check: the ONE place with the timeout, the timing and the exception net."""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import functools
import math
import time
from collections.abc import Mapping
from types import ModuleType
from typing import TYPE_CHECKING, Any

from agent.model import Observation, Result
from agent.probes import PROBES
from agent.probes.base import CheckFailed, Context
from agent.text import mask, one_line

if TYPE_CHECKING:
    from agent.config import CheckConfig

# Tasks a probe spawns (and they spawn) are recorded in the set this variable holds while it runs. A probe
# may leave a few behind on purpose (a client library's background task); past LEAK_LIMIT per check they
# are cancelled and the check fails, so a probe that forgets its tasks cannot grow the agent without bound.
_SPAWNED: contextvars.ContextVar[set[asyncio.Future[Any]] | None] = contextvars.ContextVar(
    "healthgate_spawned", default=None)
LEAK_LIMIT = 32


def _install_task_factory(loop: asyncio.AbstractEventLoop) -> None:
    previous = loop.get_task_factory()
    if getattr(previous, "healthgate", False):
        return

    def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kw: Any) -> asyncio.Future[Any]:
        task = previous(loop, coro, **kw) if previous else asyncio.Task(coro, loop=loop, **kw)
        owner = _SPAWNED.get()
        if owner is not None:  # created from inside a probe
            owner.add(task)
            task.add_done_callback(owner.discard)
        return task

    # Marks the factory as ours, so a second install on the same loop is a no-op; a function attribute,
    # which no type describes.
    factory.healthgate = True  # type: ignore[attr-defined]
    loop.set_task_factory(factory)


def _valid(obs: object) -> bool:
    if not isinstance(obs, Observation):
        return False
    return all(v is None or (isinstance(v, int | float) and math.isfinite(v)) for v in (obs.value, obs.headroom))


class Runner:
    """Runs probes under their timeouts.

    A probe that ignores cancellation is abandoned, not awaited: it stays in `hung` (so it is neither
    garbage-collected mid-flight nor started again) and its check fails until it finally ends.
    Tasks a probe spawns and leaves running are counted per check; beyond LEAK_LIMIT they are cancelled,
    the sample fails, and while they still run the probe is not started again. That bounds what a
    misbehaving probe can leak.
    """

    def __init__(self, ctx: Context, probes: Mapping[str, ModuleType] = PROBES):
        self.ctx = ctx
        self.probes = probes  # injectable so tests can run deliberately broken probes
        self.hung: dict[str, asyncio.Task] = {}
        self.spawned: dict[str, set[asyncio.Future[Any]]] = {}  # check -> tasks its probes left running

    async def run(self, check: CheckConfig) -> Result:
        loop = asyncio.get_running_loop()
        _install_task_factory(loop)
        spawned = self.spawned.setdefault(check.name, set())
        if len(spawned) > LEAK_LIMIT:
            started = loop.time()
            return Result(False, f"error: {len(spawned)} tasks of earlier samples still running", "leak", 0.0,
                          started, started, time.time())
        result = await self._sample(check, spawned)
        if len(spawned) > LEAK_LIMIT:
            for t in list(spawned):
                t.cancel()
            result = Result(False, f"error: probe left {len(spawned)} tasks running (limit {LEAK_LIMIT}); "
                                   "cancelled", "leak", result.duration, result.started, result.finished, result.wall)
        if not result.ok:
            self.ctx.keeper.discard(check.name)  # a sample failed late (its clock, a leak) may have held one
        return result

    async def _sample(self, check: CheckConfig, spawned: set[asyncio.Future[Any]]) -> Result:
        loop = asyncio.get_running_loop()
        started = loop.time()
        # Durations use perf_counter: uvloop's loop.time() ticks in whole milliseconds.
        t0 = time.perf_counter()

        secrets = check.secrets()

        def result(ok: bool, reason: str, kind: str, obs: Observation | None = None) -> Result:
            duration = time.perf_counter() - t0
            # A driver's error text may quote a URL or DSN: nothing leaves with a secret in it. And it is
            # the dependency's text (a Location header, a command's output): one printable line, masked
            # first so that a secret holding a newline or a control character still matches.
            reason = one_line(mask(reason, secrets))
            if obs is not None and obs.detail:
                detail = one_line(mask(obs.detail, secrets))
                if detail != obs.detail:
                    obs = dataclasses.replace(obs, detail=detail)
            return Result(ok, reason, kind, duration, started, loop.time(), time.time(), obs)

        previous = self.hung.get(check.name)
        if previous is not None and not previous.done():
            # The reason an operator reads stays the one that started it; this sample is not run beside it.
            return result(False, f"timeout after {check.timeout * 1000:.0f} ms: the previous sample is still hung",
                          "timeout")

        probe = self.probes[check.type].probe
        context = contextvars.copy_context()
        context.run(_SPAWNED.set, spawned)
        task = loop.create_task(probe(check, self.ctx), context=context)
        try:
            await asyncio.wait((task,), timeout=check.timeout)
        except asyncio.CancelledError:
            task.cancel()
            raise
        if not task.done():
            task.cancel()
            self.hung[check.name] = task
            task.add_done_callback(functools.partial(self._forget, check.name))
            return result(False, f"timeout after {check.timeout * 1000:.0f} ms", "timeout")
        # A probe that blocks the loop in a synchronous call (a C library, a stray time.sleep) finishes before
        # the wait's timer can fire, however long it took: the clock, not the timer, decides what was late.
        took = time.perf_counter() - t0
        if took > check.timeout:
            if not task.cancelled():
                task.exception()  # retrieved, so asyncio does not log it: the lateness is the failure
            return result(False, f"timeout: the sample took {took * 1000:.0f} ms, "
                                 f"over its {check.timeout * 1000:.0f} ms", "timeout")
        if task.cancelled():
            return result(False, "error: probe was cancelled", "error")
        exc = task.exception()
        if isinstance(exc, CheckFailed):
            obs = exc.observation if _valid(exc.observation) else None
            return result(False, exc.reason, exc.kind, obs)
        if isinstance(exc, TimeoutError):
            return result(False, f"timeout: {exc}" if str(exc) else "timeout", "timeout")
        if exc is not None:
            return result(False, f"error: {type(exc).__name__}: {exc}".rstrip(": "), "error")
        obs = task.result()
        if not _valid(obs):
            return result(False, f"invalid: probe returned {type(obs).__name__}", "invalid")
        return result(True, "", "ok", obs)

    def _forget(self, name: str, task: asyncio.Task) -> None:
        if self.hung.get(name) is task:
            del self.hung[name]
        if not task.cancelled():
            task.exception()  # retrieve it so asyncio does not log "exception never retrieved"

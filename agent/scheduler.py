"""One loop per check inside a TaskGroup, on its interval with jitter, plus the heartbeat."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import random
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from agent import logs
from agent.model import Result
from agent.runner import Runner
from agent.serving.decision import beat
from agent.state import AgentState

if TYPE_CHECKING:
    from agent.config import CheckConfig

START_RATE = 1000.0  # first samples per second at most, spread over the checks' intervals
RIDE_AFTER = 10  # a wait of at least this many heartbeats rides on a heartbeat's wake-up (see _wait)
RECHECK_RATE = 200.0  # re-checks per second at most: a server dropping every held connection at once
# (a restart, CLIENT KILL) must not start hundreds of samples in one turn of the loop


WARM_UP_MAX = 30.0  # seconds a reload's first samples may take at most, whatever the checks' timeouts
WARM_UP_SLACK = 0.5  # room for the loop's own scheduling beyond the probes' timeouts


def warm_up_bound(checks: Iterable[CheckConfig]) -> float:
    """How long a reload waits for the first samples of its new and changed checks: the longest of their
    `rise` back-to-back samples, each at most its timeout, plus slack; never more than WARM_UP_MAX."""
    longest = max((c.rise * c.timeout for c in checks), default=0.0)
    return min(WARM_UP_MAX, longest + WARM_UP_SLACK) if longest else 0.0


async def first_samples(runner: Runner, checks: Iterable[CheckConfig]) -> dict[str, list[Result]]:
    """Sample each check beside the running config, back to back, until it has `rise` passes or one
    failure, all within warm_up_bound(): a reload's make-before-break. What arrived by the bound is returned;
    samples still in flight then are cancelled (the runner cancels their probes).

    Nothing is written into the state here: the reload seeds the new config's states from these results
    in the same swap that puts the config in force, so serving never sees a check without a result.
    """
    checks = list(checks)
    results: dict[str, list[Result]] = {c.name: [] for c in checks}

    async def sample(check: CheckConfig) -> None:
        got = results[check.name]
        while len(got) < check.rise:
            got.append(await runner.run(check))
            if not got[-1].ok:
                return

    bound = warm_up_bound(checks)
    if not checks:
        return results
    try:
        async with asyncio.timeout(bound), asyncio.TaskGroup() as tg:
            for check in checks:
                tg.create_task(sample(check), name=f"warm-up:{check.name}")
    except TimeoutError:
        logs.event("reload_warm_up_timeout", logging.WARNING, seconds=round(bound, 3),
                   incomplete=sorted(c.name for c in checks if _incomplete(c, results[c.name])))
    return results


def _until(waiter: asyncio.Future[float], loop: asyncio.AbstractEventLoop, due: float) -> None:
    """A short wait's timer: ends the wait with its lateness, unless a recheck ended it first."""
    if not waiter.done():
        waiter.set_result(max(0.0, loop.time() - due))


def _incomplete(check: CheckConfig, got: list[Result]) -> bool:
    return len(got) < check.rise and all(r.ok for r in got)


class Scheduler:
    """Owns every check loop and the heartbeat; `run()` returns only when cancelled.

    Invariant: only tasks of this scheduler write check results into the state, and each check has at
    most one loop at a time (a reload cancels the old loop before starting the new one).
    """

    def __init__(self, state: AgentState, runner: Runner):
        self.state = state
        self.runner = runner
        self.loops: dict[str, asyncio.Task] = {}
        self._tg: asyncio.TaskGroup | None = None
        self.ready = asyncio.Event()  # set once every check has reported at least once
        self.on_beat: Callable[[float], None] | None = None  # called after each heartbeat (systemd watchdog)
        self._unreported: set[str] = set()  # checks without a first result, until `ready` is set
        self._riders: list[tuple[float, int, asyncio.Future[float]]] = []  # (due, seq, waiter): a heap
        self._seq = itertools.count()
        self._waits: dict[str, asyncio.Future[float]] = {}  # check -> the wait for its next sample
        self._recheck_at = 0.0  # the earliest time the next re-check may start (RECHECK_RATE)
        runner.ctx.keeper.on_drop = self.recheck

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            tg.create_task(self._heartbeat(), name="heartbeat")
            self._unreported = set(self.state.checks)
            for check in self.state.checks.values():
                self._start(check)
            if not self.state.checks:
                self.ready.set()

    def reload(self, changed: set[str]) -> None:
        """Restart the loops of new or changed checks and stop those of removed ones."""
        for name in list(self.loops):
            if name in changed or name not in self.state.checks:
                self.loops.pop(name).cancel()
                self.runner.ctx.keeper.forget(name)
        for name in changed:
            self._start(self.state.checks[name])
        if not self.ready.is_set():
            self._unreported = {n for n, st in self.state.states.items() if st.last is None}
            if not self._unreported:
                self.ready.set()

    def _start(self, check: CheckConfig) -> None:
        assert self._tg is not None
        self.loops[check.name] = self._tg.create_task(self._loop(check), name=f"check:{check.name}")

    async def _loop(self, check: CheckConfig) -> None:
        loop = asyncio.get_running_loop()
        fast = check.confirm_interval()
        # Spread first samples so many checks don't all start in the same millisecond: over a tenth of the
        # interval (at most 100 ms) for a few checks, over up to the whole interval for thousands, so the
        # first round starts at most about START_RATE samples a second (the steady rate of 1,000 checks at 1
        # s). A burst of 2,000 connects in 100 ms would make the first samples late, fail them as timeouts
        # and mark healthy checks flapping.
        spread = max(min(check.interval, 1.0) * check.jitter, len(self.state.checks) / START_RATE)
        due = loop.time() + random.uniform(0, min(check.interval, spread))
        while True:
            lag = await self._wait(check.name, due)
            start = loop.time()
            try:
                self.state.schedule_lag(lag)
                result = await self.runner.run(check)
                self.state.record(check.name, result, loop.time())
                if self._unreported:  # O(1) per result, however many checks there are
                    self._unreported.discard(check.name)
                    if not self._unreported:
                        self.ready.set()
                interval = check.interval
                if not result.ok and self.state.states[check.name].consecutive_fail < check.fall:
                    interval = fast  # confirm a first failure quickly (HAProxy's fastinter), by default
            except asyncio.CancelledError:
                raise
            except Exception as e:
                # The runner never raises; this net keeps one bug from ending the loop. The check's
                # result then goes stale, and a stale check fails: fail closed.
                logs.event("check_loop_error", logging.ERROR, check=check.name, error=repr(e))
                interval = check.interval
            due = start + interval * (1 + random.uniform(-check.jitter, check.jitter))
            due = max(due, loop.time())

    async def _wait(self, name: str, due: float) -> float:
        """Until `due`, or until recheck(name); returns how late the loop was. A long wait (a check's next
        sample, seconds away) ends on the last heartbeat before `due` instead of on a timer of its own: the
        heartbeat wakes the loop every beat anyway, and each extra wake-up of an idle loop costs about as
        much CPU as the heartbeat's. Such a sample starts at most one beat early (<= 10% of its wait, less
        than the checks' own jitter), never late, so no result ages past its staleness limit for it. Short
        waits (a first failure's quick confirmation, the first samples' spread) keep their exact timers."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        delay = due - now
        if delay <= 0:
            return -delay
        waiter: asyncio.Future[float] = loop.create_future()
        timer = None
        if delay < RIDE_AFTER * beat(self.state.config.policy.max_loop_lag):
            timer = loop.call_at(due, _until, waiter, loop, due)
        else:
            heapq.heappush(self._riders, (due, next(self._seq), waiter))
        self._waits[name] = waiter
        try:
            return await waiter  # cancelled with the check's loop (a reload): the heartbeat skips it
        finally:
            if timer is not None:
                timer.cancel()
            if self._waits.get(name) is waiter:
                del self._waits[name]

    def recheck(self, name: str) -> None:
        """Sample `name` now: its dependency dropped the connection the last passing sample left open
        (agent/probes/keep.py). Only a passing check's wait is cut short; a failing one is already on its
        quick confirmation, and one that is down samples at its interval. Re-checks start RECHECK_RATE a
        second at most, so a server dropping every held connection at once spreads them out."""
        waiter = self._waits.get(name)
        st = self.state.states.get(name)
        if waiter is None or waiter.done() or st is None or st.last is None or not st.last.ok:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        at = max(now, self._recheck_at)
        self._recheck_at = at + 1 / RECHECK_RATE
        if at <= now:
            waiter.set_result(0.0)
        else:
            loop.call_at(at, _until, waiter, loop, at)

    def _release(self, now: float, period: float, lag: float) -> None:
        """The heartbeat's: start every rider due before the next heartbeat, with this one's lateness."""
        riders = self._riders
        while riders and riders[0][0] <= now + period:
            waiter = heapq.heappop(riders)[2]
            if not waiter.done():
                waiter.set_result(lag)
        # A loop cancelled by a reload leaves its wait here until the time it was due, an hour or a day
        # away: each check has at most one live wait, so past twice that the dead ones are swept out.
        if len(riders) > 2 * len(self.loops) + 8:
            riders[:] = [r for r in riders if not r[2].done()]
            heapq.heapify(riders)

    async def _heartbeat(self) -> None:
        """The heartbeat task: each beat is a timer callback that schedules the next, not a coroutine woken
        from asyncio.sleep(), which costs a future and a step of the task per beat, and an idle agent does
        little else (the same beats, the same clock). A beat that raises ends the task with its error, as
        the sleeping coroutine did; cancelling the task cancels the next beat."""
        loop = asyncio.get_running_loop()
        failed: asyncio.Future[None] = loop.create_future()
        next_beat: asyncio.TimerHandle | None = None

        def heartbeat(due: float) -> None:
            nonlocal next_beat
            now = loop.time()
            try:
                lag = max(0.0, now - due)
                self.state.tick(now, lag)
                if self.on_beat is not None:
                    self.on_beat(now)
                period = beat(self.state.config.policy.max_loop_lag)  # a reload may change the limit
                self._release(now, period, lag)
            except (SystemExit, KeyboardInterrupt):
                raise  # out of the loop, as from any callback
            except BaseException as e:  # noqa: BLE001 - handed to the task, which raises it
                if not failed.done():
                    # A future refuses StopIteration, and the loop's handler would swallow anything raised
                    # here: the chain would end silently. The coroutine turned StopIteration into
                    # RuntimeError (PEP 479); so does this, and any other BaseException.
                    ok = isinstance(e, Exception) and not isinstance(e, StopIteration)
                    failed.set_exception(e if ok else RuntimeError(f"a heartbeat raised {e!r}"))
                return
            next_beat = loop.call_at(now + period, heartbeat, now + period)

        heartbeat(loop.time())
        try:
            await failed
        finally:
            if next_beat is not None:
                next_beat.cancel()

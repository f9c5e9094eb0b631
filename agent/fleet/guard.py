"""FleetGuard: turns "DOWN for shared reasons only" into "held" while the group can't spare this node.

Interface contract (the agent's state and serving decision use only these three):

- `observe(shared, local, now)`: called by the agent on every heartbeat (and may be called more often)
  with the names of the critical checks that hold the node down, split by scope, and the loop's
  monotonic time. Admin drain/maintenance, shutdown, a stalled loop and a bad config are local reasons.
  It never awaits and never touches the store; it updates `view()` at once, so a local fault or a cleared
  reason is reflected in the very next serving decision, and it wakes `run()` when the node's wish changes.
- `view() -> GuardView`: an immutable value, O(1), replaced whole. The serving decision is
      up = verdict.up or (not local and view.serve)
  i.e. `serve` True means "keep serving UP although shared reasons fail". With any local reason `serve`
  is False whatever the guard holds. Without shared reasons the state is "none" and `serve` False.
- `run()`: the guard's own task (put it in the agent's TaskGroup; cancel it to stop). It beats into the
  store every `heartbeat`, asks for a grant when the node fails for shared reasons only, keeps or
  re-checks a grant, releases it as soon as the reason clears. Every store call is under `timeout`;
  an error is counted and retried on the next beat, never raised. The store is closed on the way out.

States: "none" (nothing shared is failing, or a local reason decides), "held" (shared reasons fail and no
grant: keep serving), "granted" (shed: DOWN), "store_unavailable" (the store failed for `grace`:
serve = on_store_error == "serve"). The local copy of a grant lapses `ttl - margin` after the last
exchange the store confirmed, on the monotonic clock, before the store would forget it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from agent import logs
from agent.fleet.backends import open_store
from agent.fleet.config import FleetConfig
from agent.fleet.store import MemberStatus, Report, Standing, Store

GuardState = Literal["none", "held", "granted", "store_unavailable"]
STATES: tuple[GuardState, ...] = ("none", "held", "granted", "store_unavailable")
Op = Literal["beat", "acquire"]


@dataclass(frozen=True, slots=True)
class GuardView:
    """What the serving decision reads. Figures are the store's last answer (None before the first)."""

    state: GuardState = "none"
    serve: bool = False  # True: keep serving UP although shared reasons fail
    reasons: tuple[str, ...] = ()  # the shared reasons the node would be down for
    expected: int | None = None  # the group's expected size
    serving: int | None = None  # members serving, by the store's last count
    budget: int | None = None  # how many may be down
    since: float = 0.0  # monotonic time of the last state change
    store_ok: bool = True  # the last store call succeeded
    store_error: str = ""  # the last store error, while failing

    def words(self) -> str:
        """The guard's part of an explanation, for the status page and `healthgate explain`."""
        why = ", ".join(self.reasons)
        figures = ""
        if self.expected is not None and self.serving is not None:
            figures = f"; {self.serving} of {self.expected} serving, at most {self.budget} may be down"
        if self.state == "held":
            return f"held by the fleet guard: {why} failing{figures}"
        if self.state == "granted":
            return f"shed with the fleet guard's grant: {why} failing{figures}"
        if self.state == "store_unavailable":
            action = "serving" if self.serve else "shedding"
            return f"fleet store unavailable ({self.store_error or 'no answer'}): {action} although {why} failing"
        return ""


def margin(cfg: FleetConfig) -> float:
    """How much sooner than the store a local grant lapses: covers the call's own time and clock rate drift."""
    return max(cfg.timeout, cfg.ttl * 0.2)


class FleetGuard:
    """Written by the loop's own tasks only: observe() from the heartbeat, the rest from run()."""

    def __init__(self, cfg: FleetConfig, store: Store | None = None, *, rng: random.Random | None = None,
                 clock: Callable[[], float] | None = None, wall: Callable[[], float] = time.time):
        self.cfg = cfg
        self._store = store
        self._rng = rng or random.Random()
        # The running loop's clock, as the agent's `now`; injectable for tests.
        self._clock = clock or (lambda: asyncio.get_running_loop().time())
        self._wall = wall
        self._shared: tuple[str, ...] = ()
        self._local: tuple[str, ...] = ()
        self._wish_since = wall()
        self._wake = asyncio.Event()
        self._grant_until: float | None = None  # local copy of the grant: valid before this (monotonic)
        self._checked_at: float | None = None  # last budget check of the grant held (min_hold re-checks)
        self._request_at = 0.0  # no grant request before this (jitter, retry after a refusal)
        self._refusals = 0  # in a row: the retry backs off from heartbeat to min_hold
        self._recorded: MemberStatus | None = None  # the status the store holds for this node
        self._attempt_at: float | None = None  # when the last call was sent
        self._failed = False
        self._failing_since: float | None = None
        self._error = ""
        self._figures: Standing | None = None
        self._view = GuardView()
        # For /metrics once wired: decisions by outcome, store errors by kind, store call latency.
        self.decisions: collections.Counter[str] = collections.Counter()
        self.store_errors: collections.Counter[str] = collections.Counter()
        self.latency_sum = 0.0
        self.latency_count = 0

    # -- what the agent calls ----------------------------------------------------------------------

    def observe(self, shared: tuple[str, ...], local: tuple[str, ...], now: float) -> None:
        shared, local = tuple(shared), tuple(local)
        if (shared, local) != (self._shared, self._local):
            before = self._wish()
            self._shared, self._local = shared, local
            if self._wish() != before:
                self._wish_since = self._wall()
                self._refusals = 0
                if before == "shed" and self._grant_until is not None:
                    # Dropped here, not when the store confirms the release: a release that fails must not
                    # leave a copy that a returning reason would reuse without asking.
                    self._grant_until = self._checked_at = None
                    self.decisions["released"] += 1
                if self._wish() == "shed" and not self._holding(now):
                    self._request_at = now + self._rng.uniform(0, self.cfg.jitter)
                self._wake.set()
        self._refresh(now)

    def view(self) -> GuardView:
        return self._view

    async def run(self) -> None:
        store = self._store if self._store is not None else open_store(self.cfg)
        try:
            while True:
                now = self._clock()
                self._refresh(now)
                op, due = self._plan(now)
                if due > now:
                    self._wake.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(due - now):
                            await self._wake.wait()
                    continue
                await self._exchange(store, op)
        finally:
            await store.close()

    # -- decisions ---------------------------------------------------------------------------------

    def _wish(self) -> MemberStatus:
        if self._local:
            return "down"
        return "shed" if self._shared else "up"

    def _holding(self, now: float) -> bool:
        return self._grant_until is not None and now < self._grant_until

    def _unavailable(self, now: float) -> bool:
        return self._failing_since is not None and now - self._failing_since >= self.cfg.grace

    def _plan(self, now: float) -> tuple[Op, float]:
        """The next call and when it is due."""
        cfg = self.cfg
        last = self._attempt_at
        beat_due = now if last is None else last + cfg.heartbeat
        wish = self._wish()
        if self._failed:  # no faster than the heartbeat while the store fails
            return ("acquire" if wish == "shed" and not self._holding(now) else "beat"), beat_due
        if wish == "shed":
            if self._holding(now):
                recheck = (self._checked_at or now) + cfg.min_hold
                return ("acquire", recheck) if recheck <= beat_due else ("beat", beat_due)
            return ("acquire", self._request_at) if self._request_at <= beat_due else ("beat", beat_due)
        if self._recorded != wish:
            return "beat", now  # a release, or a local fault: tell the store at once
        return "beat", beat_due

    def _report(self, op: Op, now: float) -> Report:
        wish = self._wish()
        if wish == "shed" and op == "beat" and not self._holding(now):
            status: MemberStatus = "held"  # waiting for its next request: serving meanwhile
        else:
            status = wish
        return Report(self.cfg.node, status, self._shared or self._local, self._wish_since)

    async def _exchange(self, store: Store, op: Op) -> None:
        sent = self._clock()
        self._attempt_at = sent
        report = self._report(op, sent)
        call = store.acquire if op == "acquire" else (store.release if report.status in ("up", "down")
                                                      else store.beat)
        try:
            async with asyncio.timeout(self.cfg.timeout):
                standing = await call(report)
        except Exception as e:  # noqa: BLE001 - any store failure is an outcome, counted and retried
            self._store_failed(e, sent)
            return
        now = self._clock()
        self.latency_sum += now - sent
        self.latency_count += 1
        if self._failed:
            logs.event("fleet_store_recovered", logging.INFO, store=self.cfg.store_display,
                       failed_for=round(now - (self._failing_since or now), 3))
        self._failed, self._failing_since, self._error = False, None, ""
        self._apply(report, standing, op, sent, now)
        self._refresh(now)

    def _apply(self, report: Report, standing: Standing, op: Op, sent: float, now: float) -> None:
        was_holding = self._holding(now)
        self._recorded = standing.status
        if standing.expected is not None:
            self._figures = standing
        if report.status != "shed" or self._wish() != "shed":
            # A release, or an answer to a request the node no longer wants: the plan releases it next.
            self._grant_until = self._checked_at = None
            return
        if standing.granted:
            self._refusals = 0
            if not was_holding:
                self.decisions["granted"] += 1
                self._checked_at = now
            elif op == "acquire":
                self.decisions["kept"] += 1
                self._checked_at = now
            self._grant_until = sent + self.cfg.ttl - margin(self.cfg)
            return
        self.decisions["revoked" if was_holding else "refused"] += 1
        self._grant_until = self._checked_at = None
        # A held node keeps beating every heartbeat; its requests back off to one per min_hold, so a long
        # outage of a large group costs the store about one check per member per min_hold, not per beat.
        self._refusals += 1
        cfg = self.cfg
        delay = max(cfg.heartbeat, min(cfg.min_hold, cfg.heartbeat * 2 ** min(self._refusals - 1, 16)))
        self._request_at = now + delay + self._rng.uniform(0, cfg.jitter)

    def _store_failed(self, e: Exception, sent: float) -> None:
        kind = "timeout" if isinstance(e, TimeoutError) else type(e).__name__
        self.store_errors[kind] += 1
        self._error = "timed out" if isinstance(e, TimeoutError) else (str(e).strip() or type(e).__name__)
        if not self._failed:
            self._failing_since = sent
            logs.event("fleet_store_error", logging.WARNING, store=self.cfg.store_display, error=self._error)
        self._failed = True
        self._refresh(self._clock())

    def _refresh(self, now: float) -> None:
        cfg = self.cfg
        if self._local or not self._shared:
            state: GuardState = "none"
            serve = False
        elif self._holding(now):
            state, serve = "granted", False
        elif self._unavailable(now):
            state, serve = "store_unavailable", cfg.on_store_error == "serve"
        else:
            state, serve = "held", True
        figures = self._figures
        old = self._view
        since = old.since if state == old.state else now
        view = GuardView(
            state=state, serve=serve, reasons=self._shared,
            expected=figures.expected if figures else None, serving=figures.serving if figures else None,
            budget=figures.allowed if figures else None, since=since, store_ok=not self._failed,
            store_error=self._error,
        )
        if view != old:
            self._view = view
        if state != old.state:
            logs.event("fleet_guard_transition", logging.INFO if state == "none" else logging.WARNING,
                       **{"from": old.state, "to": state, "serve": serve, "reasons": list(self._shared),
                          "expected": view.expected, "serving": view.serving, "budget": view.budget})

"""Pure verdict logic: next_state() folds one result into a check's state; aggregate() decides up or down."""

from __future__ import annotations

import bisect
import heapq
import math
from collections.abc import Iterable
from dataclasses import replace
from typing import TYPE_CHECKING

from agent.config import PolicyConfig
from agent.fields import format_duration
from agent.model import CheckState, CheckView, Result, Status, Verdict
from agent.probes.base import CheckBase

if TYPE_CHECKING:
    from agent.config import CheckConfig

HISTORY = 100  # results kept per check for the status page strip


def required_rise(state: CheckState, check: CheckBase) -> int:
    return state.required_rise or check.rise


def next_state(state: CheckState, result: Result, check: CheckBase, policy: PolicyConfig, now: float,
               wall: float) -> CheckState:
    """The state after `result`. Hysteresis both ways: `fall` failures to go down, `rise` passes to go up.

    A check starts UNKNOWN (failing) and its first failure marks it DOWN at once: it was never up, so
    there is nothing to protect.

    Flap damping: every failure that follows a pass is a flap, whether or not it reached `fall`. A
    dependency failing every other sample never fails `fall` times in a row, so counting only up->down
    transitions would let it keep the node UP while half broken. A check with `flap_threshold` flaps
    within `flap_window` is flapping: it is DOWN at once, and must pass for `flap_hold` before it may
    rise again (a hold-down), so a flapping dependency keeps the node down instead of toggling it.
    """
    history = (*state.history[-(HISTORY - 1):], result.ok)
    if result.ok:
        ok, fail = state.consecutive_ok + 1, 0
    else:
        ok, fail = 0, state.consecutive_fail + 1
    threshold = policy.flap_threshold
    flaps = state.flaps
    if threshold and not result.ok and state.last is not None and state.last.ok:
        flaps = (*flaps, now)[-threshold:]  # only the newest `threshold` matter
    new = replace(state, consecutive_ok=ok, consecutive_fail=fail, last=result, history=history, flaps=flaps)

    if result.ok:
        if state.status is not Status.UP and ok >= required_rise(state, check):
            return replace(new, status=Status.UP, changed_at=now, changed_wall=wall,
                           change_reason=f"passed {ok} time(s) in a row", required_rise=None, ever_up=True)
        return new
    flapping = bool(threshold) and len(flaps) >= threshold and now - flaps[0] < policy.flap_window
    hold = max(check.rise, math.ceil(policy.flap_hold / check.interval)) if flapping else state.required_rise
    if state.status is Status.UNKNOWN or (state.status is Status.UP and (fail >= check.fall or flapping)):
        reason = result.reason
        if flapping and fail < check.fall:
            reason = (f"flapping: {threshold} failures after passes within {format_duration(policy.flap_window)}; "
                      f"last: {result.reason}")
        return replace(new, status=Status.DOWN, changed_at=now, changed_wall=wall, change_reason=reason,
                       required_rise=hold)
    return replace(new, required_rise=hold)


def stale_limit(check: CheckBase, policy: PolicyConfig) -> float:
    """How old a check's last result may be before it cannot vouch for the check any more.

    The scheduler may start the next sample up to interval * (1 + jitter) after the last one started, and
    that sample may take its whole timeout: a healthy check's results are at most that far apart.
    `stale_grace` adds room for the loop's own scheduling.
    """
    return check.interval * (1 + check.jitter) + check.timeout + policy.stale_grace


def view(check: CheckConfig, state: CheckState, policy: PolicyConfig, threshold: str | None = None,
         limit: float | None = None) -> CheckView:
    """A check as the serving paths see it. `threshold` and `limit` may be passed in, computed once per config."""
    last = state.last
    if limit is None:
        limit = stale_limit(check, policy)
    return CheckView(
        name=check.name, type=check.type, critical=check.critical, state=state,
        threshold=check.threshold() if threshold is None else threshold,
        rise=check.rise, fall=check.fall, interval=check.interval,
        fresh_until=math.inf if last is None else last.finished + limit, shared=check.fleet_scope == "shared",
    )


def stale(v: CheckView, now: float) -> bool:
    """True when the last result is too old to vouch for the check: its loop has stalled."""
    return now > v.fresh_until


def holdable(v: CheckView, now: float) -> bool:
    """A failing check the fleet guard may hold up: a shared fault (scope "shared") of a check that was UP
    and failed for real. A check that never passed, or whose results are stale (the agent's own fault),
    is never held: start down, and a stalled agent is a local reason."""
    return v.shared and v.state.ever_up and v.state.status is Status.DOWN and not stale(v, now)


def passing(v: CheckView, now: float) -> bool:
    """UP and fresh."""
    return v.state.status is Status.UP and now <= v.fresh_until


def why(v: CheckView, now: float) -> str:
    """One short phrase: why this check is not passing."""
    s = v.state
    if stale(v, now):
        return "stale: no fresh result"
    if s.status is Status.UNKNOWN:
        return "no result yet" if s.last is None else f"rising: {s.consecutive_ok} pass(es) so far"
    if s.status is Status.DOWN and s.last is not None and s.last.ok:
        need = s.required_rise
        note = f" (flapping: held down until {need} in a row)" if need else ""
        return f"recovering, {s.consecutive_ok} pass(es) so far{note}; last failure: {s.change_reason}"
    return s.last.reason if s.last is not None and s.last.reason else s.change_reason


NOTHING_CRITICAL = "no critical check: nothing to vouch for the node"


def aggregate(views: Iterable[CheckView], now: float, excluded: frozenset[str] = frozenset(),
              members: frozenset[str] | None = None) -> Verdict:
    """UP iff at least one critical check exists and every critical one passes at `now`.

    `members` (a verdict group's checks) count whether critical or not; None counts the critical checks.
    Excluded checks (?exclude=) count as passing. `until` is when this verdict stops holding without a new
    result: the earliest moment a passing critical check goes stale. The agent's own condition (its loop,
    shutdown) is not part of it: agent.serving.decision.decide() adds that.
    """
    failing = []
    critical = skipped = 0
    until = math.inf
    for v in views:
        if not (v.critical if members is None else v.name in members):
            continue
        critical += 1
        if v.name in excluded:
            skipped += 1
            continue
        if passing(v, now):
            until = min(until, v.fresh_until)
        else:
            failing.append(v)
    if critical == skipped:
        return Verdict(False, NOTHING_CRITICAL)  # nothing counted, or all of it excluded: nothing vouches
    if not failing:
        return Verdict(True, "", until=until)
    first = failing[0]
    more = f" (+{len(failing) - 1} more)" if len(failing) > 1 else ""
    return Verdict(False, f"{first.name}: {why(first, now)}{more}", tuple(v.name for v in failing),
                   shared_only=all(holdable(v, now) for v in failing))


class Tally:
    """aggregate() kept up to date one check at a time, so a result costs the same with 10 checks or 2,000.

    `update()` takes one check's new view; `verdict(now)` equals aggregate(views, now) over the latest
    view of every check (tests/test_properties.py holds it to that), for `now` that never goes back. The
    checks that pass are kept in a heap by the time they would go stale, so a tick with nothing about to
    expire is O(1), and an expiry costs O(log n). The failing checks are kept as a sorted list of their
    config positions (one bisect per change), and the names a down verdict lists are built only when that
    list changed: with every check down (at start, or in an outage) a result still costs O(log n), not a sort.
    """

    __slots__ = ("order", "views", "failing", "_heap", "_sorted", "_names", "_listed")

    def __init__(self, views: Iterable[CheckView], members: Iterable[str] | None = None):
        """`members`: the checks that count (a verdict group's); None = the critical ones (the node's)."""
        self.views: dict[str, CheckView] = {}
        self.failing: set[str] = set()  # counted checks not passing, as of the last update or expiry
        self._sorted: list[int] = []  # config positions of the failing checks, ascending
        self._listed: tuple[str, ...] | None = None  # the failing names in config order, when still current
        self._heap: list[tuple[float, str]] = []  # (fresh_until, name) of counted checks that were UP
        views = list(views)
        if members is None:
            members = [v.name for v in views if v.critical]
        self.order: dict[str, int] = {}  # the counted checks, in config order
        self._names: list[str] = []  # position -> name
        wanted = set(members)
        for v in views:
            if v.name in wanted:
                self.order[v.name] = len(self.order)
                self._names.append(v.name)
        for v in views:
            self.update(v)

    def _fail(self, name: str) -> None:
        if name not in self.failing:
            self.failing.add(name)
            bisect.insort(self._sorted, self.order[name])
            self._listed = None

    def _pass(self, name: str) -> None:
        if name in self.failing:
            self.failing.discard(name)
            sorted_ = self._sorted
            del sorted_[bisect.bisect_left(sorted_, self.order[name])]
            self._listed = None

    def update(self, v: CheckView) -> None:
        self.views[v.name] = v
        if v.name not in self.order:
            return
        if v.state.status is Status.UP:
            self._pass(v.name)
            heapq.heappush(self._heap, (v.fresh_until, v.name))
        else:
            self._fail(v.name)

    def _current(self, entry: tuple[float, str]) -> bool:
        """Whether a heap entry still describes its check (a newer result supersedes it)."""
        until, name = entry
        v = self.views[name]
        return v.fresh_until == until and v.state.status is Status.UP and name not in self.failing

    def next_expiry(self) -> float:
        """When the next passing check goes stale (as of the last verdict()), or inf."""
        return self._heap[0][0] if self._heap else math.inf

    def verdict(self, now: float) -> Verdict:
        heap = self._heap
        while heap and heap[0][0] < now:  # went stale since the last look
            entry = heapq.heappop(heap)
            if self._current(entry):
                self._fail(entry[1])
        while heap and not self._current(heap[0]):
            heapq.heappop(heap)
        if not self.order:
            return Verdict(False, NOTHING_CRITICAL)
        if not self.failing:
            return Verdict(True, "", until=heap[0][0] if heap else math.inf)
        failing = self._listed
        if failing is None:
            failing = self._listed = tuple(map(self._names.__getitem__, self._sorted))
        first = self.views[failing[0]]
        more = f" (+{len(failing) - 1} more)" if len(failing) > 1 else ""
        return Verdict(False, f"{first.name}: {why(first, now)}{more}", tuple(failing),
                       shared_only=all(holdable(self.views[n], now) for n in failing))

"""Pure verdict logic: next_state() folds one result into a check's state; aggregate() decides up or down."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import replace

from agent.config import PolicyConfig
from agent.model import CheckState, CheckView, Result, Status, Verdict
from agent.probes.base import CheckBase

HISTORY = 100  # results kept per check for the status page strip


def required_rise(state: CheckState, check: CheckBase) -> int:
    return state.required_rise or check.rise


def next_state(state: CheckState, result: Result, check: CheckBase, policy: PolicyConfig, now: float,
               wall: float) -> CheckState:
    """The state after `result`. Hysteresis both ways: `fall` failures to go down, `rise` passes to go up.

    A check starts UNKNOWN (failing) and its first failure marks it DOWN at once: it was never up, so
    there is nothing to protect. A check that flaps `flap_threshold` times within `flap_window` must
    pass for `flap_hold` before it may rise again (a hold-down), so a flapping dependency keeps the node
    down instead of toggling it.
    """
    history = (*state.history[-(HISTORY - 1):], result.ok)
    if result.ok:
        ok, fail = state.consecutive_ok + 1, 0
    else:
        ok, fail = 0, state.consecutive_fail + 1
    new = replace(state, consecutive_ok=ok, consecutive_fail=fail, last=result, history=history)

    if result.ok and state.status is not Status.UP and ok >= required_rise(state, check):
        return replace(new, status=Status.UP, changed_at=now, changed_wall=wall,
                       change_reason=f"passed {ok} time(s) in a row", required_rise=None)
    if not result.ok and (
        state.status is Status.UNKNOWN or (state.status is Status.UP and fail >= check.fall)
    ):
        flaps = state.flaps
        if state.status is Status.UP:
            flaps = tuple(t for t in flaps if now - t < policy.flap_window) + (now,)
        hold = state.required_rise
        if policy.flap_threshold and len(flaps) >= policy.flap_threshold:
            hold = max(check.rise, math.ceil(policy.flap_hold / check.interval))
        return replace(new, status=Status.DOWN, changed_at=now, changed_wall=wall, change_reason=result.reason,
                       flaps=flaps, required_rise=hold)
    return new


def is_stale(state: CheckState, check: CheckBase, policy: PolicyConfig, now: float) -> bool:
    """True when the last result is too old to vouch for the check: its loop has stalled."""
    if state.last is None:
        return False
    return now - state.last.finished > check.interval + check.timeout + policy.stale_grace


def view(check: CheckBase, state: CheckState, policy: PolicyConfig, now: float) -> CheckView:
    stale = is_stale(state, check, policy, now)
    return CheckView(
        name=check.name, type=check.type, critical=check.critical,
        passing=state.status is Status.UP and not stale, stale=stale, state=state, threshold=check.threshold(),
        rise=check.rise, fall=check.fall, interval=check.interval,
    )


def why(v: CheckView) -> str:
    """One short phrase: why this check is not passing."""
    s = v.state
    if v.stale:
        return "stale: no fresh result"
    if s.status is Status.UNKNOWN:
        return "no result yet" if s.last is None else f"rising: {s.consecutive_ok} pass(es) so far"
    if s.status is Status.DOWN and s.last is not None and s.last.ok:
        need = s.required_rise
        note = " (flapping: held down)" if need else ""
        return f"recovering, {s.consecutive_ok} pass(es) so far{note}; last failure: {s.change_reason}"
    return s.last.reason if s.last is not None and s.last.reason else s.change_reason


def aggregate(views: Iterable[CheckView], *, loop_ok: bool = True, loop_reason: str = "",
              stopping: bool = False) -> Verdict:
    """UP iff every critical check passes, the event loop is healthy and the agent isn't stopping."""
    if stopping:
        return Verdict(False, "shutting down")
    if not loop_ok:
        return Verdict(False, loop_reason or "event loop stalled")
    failing = [v for v in views if v.critical and not v.passing]
    if not failing:
        return Verdict(True, "")
    first = failing[0]
    more = f" (+{len(failing) - 1} more)" if len(failing) > 1 else ""
    return Verdict(False, f"{first.name}: {why(first)}{more}", tuple(v.name for v in failing))

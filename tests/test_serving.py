"""The serving decision as tables: freshness of snapshot and heartbeat, the agent's own condition, admin."""

from __future__ import annotations

import pytest

from agent.config import PolicyConfig
from agent.model import Admin, CheckState, Result, Snapshot, Status, Verdict
from agent.probes.tcp import Config as TcpConfig
from agent.serving.decision import STALLED, STOPPING, Condition, beat, check_up, decide, describe, excluding
from agent.verdict import aggregate, next_state, view

POLICY = PolicyConfig(flap_threshold=0)


def cond(heartbeat: float = 0.0, loop_ok_at: float = 0.0, stopping: bool = False, max_age: float = 0.5,
         drain_status: int = 503) -> Condition:
    return Condition(heartbeat=heartbeat, loop_ok_at=loop_ok_at, loop_reason="event loop lag 800 ms > 500 ms",
                     stopping=stopping, max_age=max_age, drain_status=drain_status)


def snap(up: bool = True, reason: str = "", admin: Admin = Admin.READY, admin_reason: str = "",
         computed_at: float = 0.0, until: float = float("inf"), failing: tuple[str, ...] = ()) -> Snapshot:
    return Snapshot(verdict=Verdict(up, reason, failing, until), admin=admin, admin_reason=admin_reason, checks=(),
                    computed_at=computed_at, since=0.0, since_wall=0.0, loop_lag=0.0)


# (snapshot, condition, now) -> (code, up, healthy, live, state, reason)
CASES = [
    ("healthy", snap(), cond(), 0.1, (200, True, True, True, "up", "")),
    ("checks down", snap(False, "db: refused", failing=("db",)), cond(), 0.1,
     (503, False, False, True, "down", "db: refused")),
    ("old snapshot", snap(computed_at=0.0), cond(heartbeat=1.0), 1.0, (503, False, False, False, "down", STALLED)),
    # A refresh after a stall (a result landing before the heartbeat ran) leaves a new snapshot beside an
    # old heartbeat: still stalled.
    ("new snapshot, old heartbeat", snap(computed_at=2.0), cond(heartbeat=0.4), 2.0,
     (503, False, False, False, "down", STALLED)),
    ("heartbeat at the limit", snap(computed_at=0.0), cond(heartbeat=0.0), 0.5, (200, True, True, True, "up", "")),
    ("loop recovering", snap(), cond(loop_ok_at=3.0), 0.1,
     (503, False, False, False, "down", "event loop lag 800 ms > 500 ms")),
    ("stopping", snap(), cond(stopping=True), 0.1, (503, False, False, True, "down", STOPPING)),
    ("drain", snap(admin=Admin.DRAIN, admin_reason="deploy 7"), cond(), 0.1,
     (503, False, True, True, "drain", "drain: deploy 7")),
    ("drain, 404", snap(admin=Admin.DRAIN), cond(drain_status=404), 0.1, (404, False, True, True, "drain", "drain")),
    ("maint", snap(admin=Admin.MAINT), cond(drain_status=404), 0.1, (503, False, True, True, "maint", "maint")),
    ("drain of a down node", snap(False, "db: refused", Admin.DRAIN), cond(drain_status=404), 0.1,
     (503, False, False, True, "down", "db: refused")),
    ("stalled while drained", snap(admin=Admin.DRAIN), cond(drain_status=404), 9.0,
     (503, False, False, False, "down", STALLED)),
]


@pytest.mark.parametrize("name, s, c, now, expected", CASES, ids=[c[0] for c in CASES])
def test_decide(name: str, s: Snapshot, c: Condition, now: float, expected: tuple) -> None:
    """Every consumer's answer follows from the snapshot, the agent's condition and the time alone."""
    a = decide(s, c, now)
    assert (a.code, a.up, a.healthy, a.live, a.state, a.reason) == expected


def passed(chk: TcpConfig, at: float, n: int = 3) -> CheckState:
    state = CheckState()
    for i in range(n):
        t = at - (n - 1 - i) * 0.01
        state = next_state(state, Result(True, "", "ok", 0.001, t, t, 0.0), chk, POLICY, t, 0.0)
    return state


def test_a_check_that_goes_stale_after_the_snapshot_takes_the_node_down() -> None:
    """The decision is given the time: a verdict that was UP when computed is DOWN once its check is stale,
    even when nothing refreshed the snapshot (its heartbeat age is within the limit here)."""
    chk = TcpConfig(name="db", type="tcp", port=1, interval=1.0, timeout=0.5, jitter=0.0)
    v = view(chk, passed(chk, 10.0), POLICY)
    verdict = aggregate([v], 10.0)
    s = Snapshot(verdict=verdict, admin=Admin.READY, admin_reason="", checks=(v,), computed_at=12.3, since=0.0,
                 since_wall=0.0, loop_lag=0.0)
    assert decide(s, cond(heartbeat=12.3), 12.3).up
    later = decide(s, cond(heartbeat=12.4), 12.6)
    assert not later.up and later.reason == "db: stale: no fresh result" and later.failing == ("db",)
    assert not check_up(later.fresh, v, 12.6) and check_up(True, v, 12.4)


def test_exclusions_cannot_lift_the_agents_own_condition() -> None:
    """?exclude= re-aggregates the checks; it never makes a stalled or stopping agent UP."""
    chk = TcpConfig(name="db", type="tcp", port=1)
    v = view(chk, CheckState(), POLICY)
    other = TcpConfig(name="api", type="tcp", port=1)
    w = view(other, passed(other, 1.0), POLICY)
    s = Snapshot(verdict=aggregate([v, w], 1.0), admin=Admin.READY, admin_reason="", checks=(v, w),
                 computed_at=1.0, since=0.0, since_wall=0.0, loop_lag=0.0)
    assert not decide(s, cond(heartbeat=1.0), 1.0).up
    assert decide(excluding(s, frozenset({"db"}), 1.0), cond(heartbeat=1.0), 1.0).up
    assert not decide(excluding(s, frozenset({"db"}), 1.0), cond(heartbeat=1.0, stopping=True), 1.0).up
    assert not decide(excluding(s, frozenset({"db"}), 1.0), cond(heartbeat=0.0), 1.0).up


@pytest.mark.parametrize("max_lag", [0.05, 0.1, 0.2, 0.5, 2.0])
def test_heartbeat_comes_several_times_within_the_lag_limit(max_lag: float) -> None:
    """The heartbeat is at most a quarter of max_loop_lag apart, so an idle agent never looks stalled."""
    assert beat(max_lag) <= max_lag / 4
    assert beat(max_lag) <= 0.1


@pytest.mark.parametrize("s, c, now, text", [
    (snap(), cond(), 0.1, "up"),
    (snap(admin=Admin.MAINT, admin_reason="kernel\nupdate"), cond(), 0.1, "maint: kernel update"),
    (snap(False, "db: refused"), cond(), 0.1, "down: db: refused"),
    (snap(), cond(), 5.0, f"down: {STALLED}"),
])
def test_describe(s: Snapshot, c: Condition, now: float, text: str) -> None:
    """systemd's STATUS= line: one line, from the same answer."""
    assert describe(decide(s, c, now)) == text


def test_unknown_status_is_never_up() -> None:
    """A snapshot whose only check has no result yet is DOWN with the reason of that check."""
    chk = TcpConfig(name="db", type="tcp", port=1)
    v = view(chk, CheckState(), POLICY)
    assert v.state.status is Status.UNKNOWN
    s = Snapshot(verdict=aggregate([v], 0.0), admin=Admin.READY, admin_reason="", checks=(v,), computed_at=0.0,
                 since=0.0, since_wall=0.0, loop_lag=0.0)
    a = decide(s, cond(), 0.1)
    assert not a.up and a.reason == "db: no result yet"


def _guard(state: str = "held", serve: bool = True):
    from agent.fleet.guard import GuardView

    return GuardView(state=state, serve=serve, reasons=("db",), expected=10, serving=7, budget=3)


def _failed_after_up(chk: TcpConfig, at: float) -> CheckState:
    state = passed(chk, at - 0.5)
    return next_state(state, Result(False, "refused", "refused", 0.001, at, at, 0.0), chk, POLICY, at, 0.0)


@pytest.mark.parametrize("scope, was_up, guard, held", [
    ("shared", True, _guard(), True),  # a shared fault the fleet cannot spare: held UP
    ("shared", True, _guard("granted", False), False),  # the guard granted shedding: DOWN
    ("shared", True, None, False),  # no fleet guard: DOWN as ever
    ("local", True, _guard(), False),  # a local fault is never held
    ("shared", False, _guard(), False),  # a check that never passed is never held: start down
])
def test_the_fleet_guard_holds_only_shared_faults(scope: str, was_up: bool, guard, held: bool) -> None:
    """The guard may turn DOWN-for-shared-reasons into held (UP), never a local reason, never a check that
    was never UP, and only while it says serve."""
    import dataclasses

    chk = TcpConfig(name="db", type="tcp", port=1, fall=1, rise=1, scope=scope)
    st_ = _failed_after_up(chk, 10.0) if was_up else next_state(
        CheckState(), Result(False, "refused", "refused", 0.001, 10.0, 10.0, 0.0), chk, POLICY, 10.0, 0.0)
    v = view(chk, st_, POLICY)
    s = Snapshot(verdict=aggregate([v], 10.0), admin=Admin.READY, admin_reason="", checks=(v,), computed_at=10.0,
                 since=0.0, since_wall=0.0, loop_lag=0.0)
    a = decide(s, dataclasses.replace(cond(heartbeat=10.0), guard=guard), 10.0)
    assert (a.up, a.held) == (held, held)
    if held:
        assert a.code == 200 and a.note.startswith("held by the fleet guard: db failing")
        assert describe(a).startswith("up, held by the fleet guard")
    else:
        assert a.code == 503


def test_the_guard_never_lifts_the_agents_own_condition_or_an_admin_drain() -> None:
    """A held node that stalls, stops or is drained by an operator is DOWN (or drained) whatever the guard."""
    import dataclasses

    chk = TcpConfig(name="db", type="tcp", port=1, fall=1, rise=1)
    v = view(chk, _failed_after_up(chk, 10.0), POLICY)
    s = Snapshot(verdict=aggregate([v], 10.0), admin=Admin.READY, admin_reason="", checks=(v,), computed_at=10.0,
                 since=0.0, since_wall=0.0, loop_lag=0.0)
    held = dataclasses.replace(cond(heartbeat=10.0), guard=_guard())
    assert decide(s, held, 10.0).up
    assert not decide(s, dataclasses.replace(held, stopping=True), 10.0).up
    assert not decide(s, dataclasses.replace(held, loop_ok_at=12.0), 10.0).up
    assert not decide(s, held, 11.0).up  # stalled: the heartbeat is a second old
    assert decide(dataclasses.replace(s, admin=Admin.DRAIN), held, 10.0).code == 503

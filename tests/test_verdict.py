"""The verdict policy as tables: rise/fall, start-down, critical vs not, staleness, loop, drain, flapping."""

from __future__ import annotations

import pytest

from agent.config import PolicyConfig
from agent.model import Admin, CheckState, Result, Status
from agent.probes.tcp import Config as TcpConfig
from agent.verdict import aggregate, is_stale, next_state, view

POLICY = PolicyConfig(flap_threshold=0)


def check(name: str = "c", rise: int = 3, fall: int = 2, critical: bool = True, interval: float = 1.0,
          timeout: float = 0.5) -> TcpConfig:
    return TcpConfig(name=name, type="tcp", port=1, rise=rise, fall=fall, critical=critical, interval=interval,
                     timeout=timeout)


def result(ok: bool, t: float = 0.0) -> Result:
    return Result(ok, "" if ok else "boom", "ok" if ok else "failed", 0.001, t, t, 0.0)


def fold(samples: str, chk: TcpConfig, policy: PolicyConfig = POLICY, dt: float = 1.0) -> list[Status]:
    """Feed '+' (pass) and '-' (fail) samples one per `dt`; return the status after each."""
    state, out = CheckState(), []
    for i, s in enumerate(samples):
        state = next_state(state, result(s == "+", i * dt), chk, policy, i * dt, 0.0)
        out.append(state.status)
    return out


U, D, N = Status.UP, Status.DOWN, Status.UNKNOWN


@pytest.mark.parametrize(
    "samples, rise, fall, expected",
    [
        ("", 3, 2, []),
        ("+", 3, 2, [N]),  # start down: one pass is not enough
        ("+++", 3, 2, [N, N, U]),  # up after `rise` passes
        ("++-+++", 3, 2, [N, N, D, D, D, U]),  # a failure before rising resets the count
        ("-", 3, 2, [D]),  # never up: the first failure marks it down at once
        ("+++-", 3, 2, [N, N, U, U]),  # one failure is not `fall`
        ("+++--", 3, 2, [N, N, U, U, D]),  # down after `fall` failures
        ("+++-+-", 3, 2, [N, N, U, U, U, U]),  # failures must be consecutive
        ("+++--++", 3, 2, [N, N, U, U, D, D, D]),  # rising again needs `rise` passes
        ("+++--+++", 3, 2, [N, N, U, U, D, D, D, U]),
        ("+-", 1, 1, [U, D]),  # rise=fall=1: every sample decides
    ],
)
def test_rise_and_fall(samples: str, rise: int, fall: int, expected: list[Status]) -> None:
    """A check goes down after `fall` consecutive failures and up after `rise` consecutive passes."""
    assert fold(samples, check(rise=rise, fall=fall)) == expected


def test_counts_and_transition_reason() -> None:
    """A state keeps consecutive counts and why it last changed."""
    state = CheckState()
    for i, ok in enumerate([True, True, True, False, False]):
        state = next_state(state, result(ok, i), check(), POLICY, float(i), 100.0 + i)
    assert (state.consecutive_ok, state.consecutive_fail) == (0, 2)
    assert state.status is D and state.change_reason == "boom" and state.changed_at == 4.0
    assert state.history == (True, True, True, False, False)


def _views(*pairs: tuple[TcpConfig, str], now: float | None = None, policy: PolicyConfig = POLICY):
    out = []
    for chk, samples in pairs:
        state = CheckState()
        for i, s in enumerate(samples):
            state = next_state(state, result(s == "+", float(i)), chk, policy, float(i), 0.0)
        out.append(view(chk, state, policy, float(len(samples) - 1) if now is None else now))
    return out


@pytest.mark.parametrize(
    "a, b, b_critical, up",
    [
        ("+++", "+++", True, True),
        ("+++", "---", True, False),
        ("+++", "---", False, True),  # a non-critical check never moves the verdict
        ("+++", "", True, False),  # unknown counts as failing
        ("+++", "", False, True),
        ("++", "+++", True, False),  # still rising: down
        ("+++--", "+++", True, False),
    ],
)
def test_aggregate_critical_and_unknown(a: str, b: str, b_critical: bool, up: bool) -> None:
    """The node is UP iff every critical check is up."""
    views = _views((check("a"), a), (check("b", critical=b_critical), b), now=2.0)
    assert aggregate(views).up is up


def test_no_checks_is_up() -> None:
    """A config with no critical checks vouches for the agent alone."""
    assert aggregate([]).up


def test_down_reason_names_the_check() -> None:
    """The reason of a DOWN verdict names the first failing critical check and why."""
    v = aggregate(_views((check("db"), "---"), (check("api"), "+++")))
    assert not v.up and v.reason == "db: boom" and v.failing == ("db",)


@pytest.mark.parametrize(
    "age, stale",
    [(0.0, False), (1.0, False), (2.4, False), (2.6, True), (100.0, True)],
)
def test_staleness(age: float, stale: bool) -> None:
    """A result older than interval + timeout + grace (1 + 0.5 + 1 s here) counts as failing."""
    chk = check(interval=1.0, timeout=0.5)
    state = CheckState()
    for _ in range(3):
        state = next_state(state, result(True, 0.0), chk, POLICY, 0.0, 0.0)
    assert is_stale(state, chk, POLICY, age) is stale
    assert aggregate([view(chk, state, POLICY, age)]).up is (not stale)


def test_stale_reason() -> None:
    """A stale check says so in the verdict's reason."""
    v = aggregate(_views((check("a"), "+++"), now=60.0))
    assert not v.up and "stale" in v.reason


@pytest.mark.parametrize(
    "loop_ok, stopping, up",
    [(True, False, True), (False, False, False), (True, True, False), (False, True, False)],
)
def test_loop_and_shutdown_fail_closed(loop_ok: bool, stopping: bool, up: bool) -> None:
    """An unhealthy event loop or a shutdown makes the verdict DOWN whatever the checks say."""
    views = _views((check("a"), "+++"))
    assert aggregate(views, loop_ok=loop_ok, loop_reason="lag", stopping=stopping).up is up


@pytest.mark.parametrize(
    "admin, verdict_up, serving",
    [(Admin.READY, True, True), (Admin.DRAIN, True, False), (Admin.MAINT, True, False),
     (Admin.READY, False, False), (Admin.DRAIN, False, False)],
)
def test_drain_and_maintenance(admin: Admin, verdict_up: bool, serving: bool) -> None:
    """Drain or maintenance turns a healthy node's served answer DOWN; they never turn a down node up."""
    from agent.model import Snapshot, Verdict

    snap = Snapshot(verdict=Verdict(verdict_up, ""), admin=admin, admin_reason="", checks=(), computed_at=0.0,
                    since=0.0, since_wall=0.0, loop_lag=0.0, live=True)
    assert snap.serving_up is serving


def test_flapping_check_is_held_down() -> None:
    """After flap_threshold up->down changes in flap_window, rising needs flap_hold of passes."""
    policy = PolicyConfig(flap_threshold=3, flap_window=60, flap_hold=10)
    chk = check(rise=2, fall=1)
    statuses = fold("++-++-++-" + "+" * 9 + "+", chk, policy)
    # first two flaps recover after `rise`; the third holds it down for 10 passes (10 s / 1 s interval)
    assert statuses[:9] == [N, U, D, D, U, D, D, U, D]
    assert statuses[9:18] == [D] * 9
    assert statuses[18] is U


def test_flaps_outside_the_window_are_forgotten() -> None:
    """Flaps older than flap_window do not count toward a hold-down."""
    policy = PolicyConfig(flap_threshold=3, flap_window=5, flap_hold=10)
    chk = check(rise=2, fall=1)
    statuses = fold("++-++++++-++++++-++", chk, policy)
    assert statuses[-1] is U


def test_alternating_failures_are_flapping() -> None:
    """A check failing every other sample never fails `fall` times in a row, yet it is flapping: it goes
    DOWN at the flap_threshold-th failure after a pass and stays down while it keeps alternating."""
    policy = PolicyConfig(flap_threshold=3, flap_window=60, flap_hold=10)
    statuses = fold("++" + "-+" * 10, check(rise=2, fall=2), policy)
    assert statuses[:3] == [N, U, U]  # the first blip is absorbed by `fall`
    assert statuses[5] is U and statuses[6] is D  # the third failure after a pass: flapping
    assert set(statuses[6:]) == {D}
    state = CheckState()
    for i, s in enumerate("++-+-+-"):
        state = next_state(state, result(s == "+", float(i)), check(rise=2, fall=2), policy, float(i), 0.0)
    assert state.change_reason == "flapping: 3 failures after passes within 1m; last: boom"

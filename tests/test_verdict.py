"""The verdict policy as tables: rise/fall, start-down, critical vs not, staleness, loop, drain, flapping."""

from __future__ import annotations

import pytest

from agent.config import PolicyConfig
from agent.model import CheckState, Result, Status
from agent.probes.tcp import Config as TcpConfig
from agent.verdict import aggregate, next_state, stale, stale_limit, view

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


def _views(*pairs: tuple[TcpConfig, str], policy: PolicyConfig = POLICY):
    out = []
    for chk, samples in pairs:
        state = CheckState()
        for i, s in enumerate(samples):
            state = next_state(state, result(s == "+", float(i)), chk, policy, float(i), 0.0)
        out.append(view(chk, state, policy))
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
    views = _views((check("a"), a), (check("b", critical=b_critical), b))
    assert aggregate(views, 4.0).up is up


@pytest.mark.parametrize("critical", [(), (False,), (False, False)])
def test_nothing_critical_is_down(critical: tuple[bool, ...]) -> None:
    """No checks, or only non-critical ones, vouch for nothing: the verdict is DOWN and says why."""
    views = _views(*((check(f"c{i}", critical=c), "+++") for i, c in enumerate(critical)))
    v = aggregate(views, 2.0)
    assert not v.up and v.reason == "no critical check: nothing to vouch for the node"


def test_excluded_checks_count_as_passing() -> None:
    """?exclude= names count as passing, but an exclusion never creates a critical check."""
    views = _views((check("db"), "---"), (check("api"), "+++"))
    assert aggregate(views, 2.0, excluded=frozenset({"db"})).up
    assert not aggregate(views, 2.0, excluded=frozenset({"api"})).up


def test_down_reason_names_the_check() -> None:
    """The reason of a DOWN verdict names the first failing critical check and why."""
    v = aggregate(_views((check("db"), "---"), (check("api"), "+++")), 2.0)
    assert not v.up and v.reason == "db: boom" and v.failing == ("db",)


def test_up_verdict_says_until_when_it_holds() -> None:
    """An UP verdict holds until its first passing critical check would go stale, and no longer."""
    fast, slow = check("fast", interval=1.0), check("slow", interval=10.0)
    views = _views((fast, "+++"), (slow, "+++"))
    v = aggregate(views, 2.0)
    assert v.up and v.until == 2.0 + stale_limit(fast, POLICY)
    assert not aggregate(views, v.until + 0.001).up


@pytest.mark.parametrize(
    "age, is_stale",
    [(0.0, False), (1.0, False), (2.5, False), (2.65, True), (100.0, True)],
)
def test_staleness(age: float, is_stale: bool) -> None:
    """A result older than interval * (1 + jitter) + timeout + grace (1.1 + 0.5 + 1 s here) counts as failing."""
    chk = check(interval=1.0, timeout=0.5)
    assert chk.jitter == 0.1
    state = CheckState()
    for _ in range(3):
        state = next_state(state, result(True, 0.0), chk, POLICY, 0.0, 0.0)
    assert stale(view(chk, state, POLICY), age) is is_stale
    assert aggregate([view(chk, state, POLICY)], age).up is (not is_stale)


def test_stale_limit_allows_for_jitter() -> None:
    """The longest gap the scheduler may leave between two results (interval stretched by jitter, then a
    whole timeout) is never stale: an always-passing check is never reported stale (a false DOWN)."""
    chk = TcpConfig(name="j", type="tcp", port=1, interval=4.0, jitter=0.5, timeout=1.0)
    policy = PolicyConfig(stale_grace=0.1)
    worst_gap = chk.interval * (1 + chk.jitter) + chk.timeout
    assert stale_limit(chk, policy) > worst_gap


def test_stale_reason() -> None:
    """A stale check says so in the verdict's reason."""
    v = aggregate(_views((check("a"), "+++")), 60.0)
    assert not v.up and "stale" in v.reason


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

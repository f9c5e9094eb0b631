"""The fleet budget as pure arithmetic (hypothesis): any size, share, count and member churn keeps the bound."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.fleet.budget import (
    BPS,
    MaxDown,
    allowed_down,
    expected_size,
    grant,
    may_shed,
    min_serving,
    parse_max_down,
)
from agent.fleet.scope import DEFAULT_SCOPE, default_scope
from agent.probes import PROBES

SETTINGS = settings(max_examples=300, deadline=None)
rules = st.one_of(st.builds(MaxDown, count=st.integers(0, 2000)), st.builds(MaxDown, bps=st.integers(0, BPS)))


@pytest.mark.parametrize("text, want", [("30%", MaxDown(bps=3000)), ("12.5%", MaxDown(bps=1250)),
                                        (" 100 % ", MaxDown(bps=BPS)), ("0%", MaxDown(bps=0)), (3, MaxDown(count=3)),
                                        ("7", MaxDown(count=7)), (0, MaxDown(count=0))])
def test_max_down_is_parsed(text: object, want: MaxDown) -> None:
    """A share with up to two decimals becomes basis points; a number (or a string of digits) a count."""
    assert parse_max_down(text) == want


@pytest.mark.parametrize("text, message", [("101%", "more than 100%"), ("1.234%", "is not a share or a count"),
                                           (-1, "non-negative"), (True, "not a boolean"), ("half", "not a share"),
                                           (2.5, "not a share")])
def test_bad_max_down_is_refused_in_words(text: object, message: str) -> None:
    """A max_down that is neither a share nor a count is refused with what to write instead."""
    with pytest.raises(ValueError, match=message):
        parse_max_down(text)


@SETTINGS
@given(rules, st.integers(0, 100_000))
def test_allowed_down_never_exceeds_the_share_or_the_group(rule: MaxDown, expected: int) -> None:
    """0 <= allowed <= expected; a share is never exceeded and rounds down by less than one node; a count
    is the count, capped at the group."""
    allowed = allowed_down(rule, expected)
    assert 0 <= allowed <= expected
    assert min_serving(rule, expected) == expected - allowed
    if rule.bps is not None:
        assert allowed * BPS <= rule.bps * expected < (allowed + 1) * BPS
    else:
        assert allowed == min(rule.count, expected)


@SETTINGS
@given(st.integers(0, BPS), st.integers(0, BPS), st.integers(0, 100_000))
def test_a_larger_share_never_allows_fewer(a: int, b: int, expected: int) -> None:
    """Monotonic in the share."""
    lo, hi = sorted((a, b))
    assert allowed_down(MaxDown(bps=lo), expected) <= allowed_down(MaxDown(bps=hi), expected)


@SETTINGS
@given(st.one_of(st.none(), st.integers(1, 1000)), st.integers(0, 1000))
def test_expected_size_is_the_larger_of_configured_and_seen(size: int | None, seen: int) -> None:
    """A configured size is a floor: members seen beyond it raise the expected size, never lower it."""
    assert expected_size(size, seen) == max(size or 0, seen)


@SETTINGS
@given(rules, st.integers(1, 500), st.integers(0, 500))
def test_grant_and_may_shed_agree(rule: MaxDown, expected: int, serving: int) -> None:
    """A serving member may shed exactly when may_shed() says at least one more may."""
    serving = min(serving, expected)
    if serving:
        assert grant(rule, expected, serving - 1) == (may_shed(rule, expected, serving) >= 1)


# A group's life: members join, die (stop beating), fail locally, recover, ask for a grant, release it.
events = st.lists(st.tuples(st.sampled_from(["join", "die", "local", "recover", "ask", "release"]),
                            st.integers(0, 10_000)), max_size=300)


@SETTINGS
@given(rules, st.one_of(st.none(), st.integers(1, 60)), st.integers(1, 60), events)
def test_sequential_grants_keep_the_minimum_serving_under_churn(rule: MaxDown, size: int | None, start: int,
                                                                 history: list[tuple[str, int]]) -> None:
    """Whatever the churn, a grant is given only if the members serving besides the asker make the
    minimum, so right after every grant serving >= min_serving; a refusal happens only when they don't;
    and with no death or local fault, grants alone never exceed allowed_down."""
    status = {i: "up" for i in range(start)}  # up | held | shed | down | dead
    seen = set(status)
    churned = False
    for what, pick in history:
        names = sorted(status)
        node = names[pick % len(names)] if names else None
        if what == "join":
            node = len(seen)
            status[node] = "up"
            seen.add(node)
            continue
        if node is None:
            continue
        if what == "die":
            churned |= status[node] != "dead"
            status[node] = "dead"
        elif what == "local" and status[node] != "dead":
            churned = True
            status[node] = "down"
        elif what in ("recover", "release") and status[node] in ("down", "shed", "held"):
            status[node] = "up"
        elif what == "ask" and status[node] in ("up", "held", "shed"):
            expected = expected_size(size, len(seen))
            others = sum(1 for n, s in status.items() if n != node and s in ("up", "held"))
            ok = grant(rule, expected, others)
            status[node] = "shed" if ok else "held"
            serving = sum(1 for s in status.values() if s in ("up", "held"))
            if ok:
                assert serving >= min_serving(rule, expected)
            else:
                assert others < min_serving(rule, expected)
            if not churned:
                shed = sum(1 for s in status.values() if s == "shed")
                assert shed <= allowed_down(rule, expected)


def test_every_check_type_has_a_documented_scope() -> None:
    """Each registered check type has a default scope; dependencies and overload are shared, the rest local."""
    assert set(DEFAULT_SCOPE) == set(PROBES)
    assert {t for t, s in DEFAULT_SCOPE.items() if s == "shared"} == {
        "tcp", "http", "tls", "dns", "redis", "postgres", "cpu", "load", "pressure", "listen_queue"}
    assert default_scope("no-such-type") == "local"

"""The trust core's edges that mutation testing (docs/mutation.md) found no test holding: each test one behaviour."""

from __future__ import annotations

import ipaddress
import math
import socket
import time
import types
from dataclasses import replace
from pathlib import Path

import pytest

from agent.access import admitted, is_unix, peer, trusted, within
from agent.admin import (
    READY,
    AdminRecord,
    AdminWriteError,
    encode,
    keeping_groups,
    make_record,
    parse_for,
    read_record,
    sanitize,
    setting_group,
    state_path,
)
from agent.config import PolicyConfig, parse_config
from agent.fleet.guard import GuardView
from agent.model import Admin, CheckState, CheckView, Group, Result, Snapshot, Status, Verdict
from agent.probes.tcp import Config as TcpConfig
from agent.serving import admin_watch
from agent.serving.admin_watch import AdminWatcher
from agent.serving.decision import (
    STALLED,
    Answer,
    Condition,
    agent_check_reason,
    agent_check_words,
    beat,
    check_state,
    decide,
    excluding,
    health_response,
    live_response,
    unknown_group,
)
from agent.state import AgentState
from agent.text import mask, mask_all, one_line, printable, tidy, tidy_all
from agent.verdict import HISTORY, NOTHING_CRITICAL, Tally, aggregate, next_state, passing, stale, view, why
from tests.helpers import PASSING

# -- agent/access.py: who a client is ------------------------------------------------------------------


class Transport:
    """What access.py reads of an asyncio transport: its socket and its peer's address."""

    def __init__(self, peername: object = None, family: int | None = None):
        self.extra = {"peername": peername, "socket": None if family is None else types.SimpleNamespace(family=family)}

    def get_extra_info(self, name: str) -> object:
        return self.extra.get(name)


UNIX = Transport("", socket.AF_UNIX)
LAN = [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8")]


def test_only_a_unix_socket_connection_is_the_admin_socket() -> None:
    """A unix-socket connection is the admin socket; a TCP one, one without a socket, or none at all is not."""
    assert is_unix(UNIX)
    assert not is_unix(Transport(("10.0.0.1", 80), socket.AF_INET))
    assert not is_unix(Transport(("10.0.0.1", 80)))
    assert not is_unix(None)


@pytest.mark.parametrize("peername, address", [
    (("10.1.2.3", 4000), "10.1.2.3"),
    (("fd00::7%eth0", 4000, 0, 2), "fd00::7"),  # a scope id is not part of the address
    (("::ffff:10.1.2.3", 4000, 0, 0), "10.1.2.3"),  # a dual-stack listener's IPv4 client, as IPv4
    (("::1", 4000, 0, 0), "::1"),
    ("", None),  # a unix socket's peer has no address
    ((), None),
    (("not an address", 1), None),
    (None, None),
])
def test_peer_is_the_clients_ip_address(peername: object, address: str | None) -> None:
    """The peer is the client's IP address, IPv4-mapped IPv6 as IPv4, and None when it has none."""
    expected = None if address is None else ipaddress.ip_address(address)
    assert peer(Transport(peername)) == expected
    assert peer(None) is None


def test_within_matches_only_networks_of_the_addresss_version() -> None:
    """An address is within a list when a network of its own version holds it; no address is within none."""
    assert within(ipaddress.ip_address("10.9.9.9"), LAN)
    assert within(ipaddress.ip_address("fd00::1"), LAN)
    assert not within(ipaddress.ip_address("192.168.1.1"), LAN)
    assert not within(ipaddress.ip_address("::ffff:10.0.0.1"), [ipaddress.ip_network("10.0.0.0/8")])
    assert not within(None, LAN)


def test_admitted_is_everyone_without_an_allow_list_else_the_listed_and_the_admin_socket() -> None:
    """Without an allow-list anyone is served; with one, a listed address and the admin socket only."""
    stranger = Transport(("192.168.1.1", 5000), socket.AF_INET)
    assert admitted(stranger, None)
    assert admitted(UNIX, [])
    assert admitted(Transport(("10.0.0.5", 5000), socket.AF_INET), LAN)
    assert not admitted(stranger, LAN)
    assert not admitted(Transport(("10.0.0.5", 5000), socket.AF_INET), [])


def test_trusted_is_the_admin_socket_or_a_trusted_network_never_loopback_by_itself() -> None:
    """Details without a token: the admin socket and the trusted networks; loopback only when listed."""
    loopback = Transport(("127.0.0.1", 5000), socket.AF_INET)
    assert trusted(UNIX, [])
    assert trusted(Transport(("10.0.0.5", 5000), socket.AF_INET), LAN)
    assert not trusted(loopback, LAN)
    assert trusted(loopback, [ipaddress.ip_network("127.0.0.1/32")])


# -- agent/text.py: secrets masked, outside text made printable ---------------------------------------


class Leaf:
    """A value no serialiser knows, whose text holds the secret."""

    def __str__(self) -> str:
        return "leaf pw1"


def test_mask_replaces_every_occurrence_of_every_secret() -> None:
    """Every occurrence of every non-empty secret becomes ***; an empty secret changes nothing."""
    assert mask("a pw1 b pw1 c pw2", ("pw1", "", "pw2")) == "a *** b *** c ***"


def test_mask_all_masks_keys_values_and_nested_items() -> None:
    """Strings anywhere in a structure are masked, dict keys too; tuples come back as lists."""
    obj = {"dsn pw1": ["x pw1", ("pw1", {"k": "pw1 pw1"})], "n": 3}
    assert mask_all(obj, ("pw1",)) == {"dsn ***": ["x ***", ["***", {"k": "*** ***"}]], "n": 3}


def test_mask_all_without_secrets_returns_the_object_itself() -> None:
    """Without secrets nothing is copied: the same object comes back."""
    obj = {"a": ["b"]}
    assert mask_all(obj, ()) is obj


def test_mask_all_turns_unknown_leaves_into_masked_text_with_a_default() -> None:
    """With `default`, a leaf no serialiser knows becomes its masked text, as a key, a value or an item;
    numbers, booleans and None stay what they are."""
    leaf = Leaf()
    assert mask_all({leaf: leaf, "l": [leaf]}, ("pw1",), default=str) == {"leaf ***": "leaf ***", "l": ["leaf ***"]}
    assert mask_all([1, 2.5, True, None], ("pw1",), default=str) == [1, 2.5, True, None]
    assert mask_all(leaf, ("pw1",)) is leaf  # no default: left for the serialiser to refuse


def test_printable_escapes_controls_formats_and_line_separators() -> None:
    """Controls show as \\xNN, format characters (a bidi override) and line separators as \\uNNNN."""
    assert printable("a\x1b[31mb\n") == "a\\x1b[31mb\\x0a"
    assert printable("x\u202ey") == "x\\u202ey"
    assert printable("p\u2028q\u2029") == "p\\u2028q\\u2029"
    assert printable("café ~ XYZ") == "café ~ XYZ"


def test_one_line_collapses_space_and_escapes_the_rest() -> None:
    """White space of any kind becomes one space, trimmed; other controls are escaped."""
    assert one_line("  a\n\t b\u2028c \x07 ") == "a b c \\x07"


@pytest.mark.parametrize("text, limit, expected", [
    ("x" * 10, 10, "x" * 10),  # exactly the limit: kept whole
    ("abcd efgh", 8, "abcd..."),  # the cut is trimmed before the ellipsis
    ("abcdefghij", 8, "abcde..."),
])
def test_one_line_bounds_its_length(text: str, limit: int, expected: str) -> None:
    """A line longer than `limit` is cut to `limit` characters, ending in '...'."""
    assert one_line(text, limit) == expected


@pytest.mark.parametrize("text, limit, expected", [
    ("a~b", 200, "a~b"),  # '~' is the last printable ASCII character
    ("x" * 20, 20, "x" * 20),
    ("abcd efgh", 8, "abcd..."),
])
def test_sanitize_edges(text: str, limit: int, expected: str) -> None:
    """sanitize() keeps '~', keeps a reason of exactly `limit` characters, trims the cut before '...'."""
    assert sanitize(text, limit) == expected


# -- agent/serving/decision.py: the one serving decision -------------------------------------------------------

COND = Condition(heartbeat=0.0, loop_ok_at=0.0, loop_reason="event loop lag 800 ms > 500 ms", stopping=False,
                 max_age=0.5, drain_status=404)


def cv(name: str, status: Status = Status.UP, critical: bool = True, fresh_until: float = math.inf,
       shared: bool = False, ever_up: bool = True, reason: str = "refused") -> CheckView:
    ok = status is Status.UP
    last = Result(ok, "" if ok else reason, "ok" if ok else "error", 0.001, 0.0, 0.0, 0.0)
    state = CheckState(status=status, last=last, change_reason=reason, ever_up=ever_up)
    return CheckView(name, "tcp", critical, state, fresh_until=fresh_until, shared=shared)


def snapshot(checks: tuple[CheckView, ...] = (), groups: dict[str, Group] | None = None, admin: Admin = Admin.READY,
             admin_reason: str = "", computed_at: float = 0.0) -> Snapshot:
    return Snapshot(verdict=aggregate(checks, computed_at), admin=admin, admin_reason=admin_reason,
                    checks=checks, computed_at=computed_at, since=0.0, since_wall=0.0, loop_lag=0.0, groups=groups or {})


def test_beat_is_a_quarter_of_the_lag_limit_at_most_a_tenth_of_a_second() -> None:
    """The heartbeat comes every max_loop_lag/4, capped at BEAT."""
    assert beat(0.2) == 0.05
    assert beat(10.0) == 0.1


def test_the_loop_is_healthy_again_at_loop_ok_at() -> None:
    """At the very moment loop_ok_at is reached the node may be up and live again."""
    c = replace(COND, heartbeat=3.0, loop_ok_at=3.0)
    a = decide(snapshot((cv("db"),), computed_at=3.0), c, 3.0)
    assert (a.up, a.live, a.agent_reason) == (True, True, "")


def test_a_healthy_answer_has_no_reasons_and_vouches() -> None:
    """An UP answer is fresh and carries no reason of any kind, nor a fleet note."""
    a = decide(snapshot((cv("db"),)), COND, 0.1)
    assert (a.fresh, a.reason, a.down_reason, a.agent_reason, a.note, a.failing) == (True, "", "", "", "", ())


def test_a_down_answer_says_why_and_names_the_failing_checks() -> None:
    """A node down for its checks says the checks' reason and lists them; its own condition is fine."""
    a = decide(snapshot((cv("db", Status.DOWN),)), COND, 0.1)
    assert (a.down_reason, a.agent_reason, a.failing) == ("db: refused", "", ("db",))


def test_a_stalled_agent_names_no_failing_check() -> None:
    """Down for the agent's own reasons, the answer lists no check as the culprit."""
    a = decide(snapshot((cv("db", Status.DOWN),)), COND, 5.0)
    assert (a.agent_reason, a.down_reason, a.failing, a.fresh) == (STALLED, STALLED, (), False)


def test_a_held_answer_has_no_down_reason_and_an_unheld_one_no_note() -> None:
    """Held by the fleet guard, the node is healthy (no down reason) and the note says why; a guard that
    does not hold leaves no note."""
    checks = (cv("dep", Status.DOWN, shared=True),)
    holding = GuardView(state="held", serve=True, reasons=("dep",))
    held = decide(snapshot(checks), replace(COND, guard=holding), 0.1)
    assert (held.held, held.healthy, held.down_reason) == (True, True, "")
    assert held.note == holding.words()
    talking = GuardView(state="granted", serve=False, reasons=("dep",))  # a guard with words of its own
    up = decide(snapshot((cv("db"),)), replace(COND, guard=talking), 0.1)
    assert (up.up, up.held, up.note) == (True, False, "")


def test_a_groups_answer_is_its_own_verdict_and_admin_state() -> None:
    """/health/<group> answers the group's verdict and its own drain; a node-wide maintenance overrides it."""
    checks = (cv("api"), cv("db", Status.DOWN, critical=False))
    groups = {"g": Group(aggregate(checks, 0.0, members=frozenset({"db"})), frozenset({"db"})),
              "h": Group(aggregate(checks, 0.0, members=frozenset({"api"})), frozenset({"api"}), Admin.DRAIN,
                         "reindex")}
    s = snapshot(checks, groups)
    assert decide(s, COND, 0.1).up
    g = decide(s, COND, 0.1, "g")
    assert (g.up, g.down_reason) == (False, "db: refused")
    h = decide(s, COND, 0.1, "h")
    assert (h.healthy, h.state, h.reason, h.code) == (True, "drain", "drain: reindex", 404)
    maint = decide(snapshot(checks, groups, Admin.MAINT, "kernel"), COND, 0.1, "h")
    assert (maint.state, maint.reason) == ("maint", "maint: kernel")


def test_a_group_asks_its_own_fleet_guard_never_the_nodes() -> None:
    """A group down for shared reasons is held by its own guard's grant to serve, not by the node's: the
    node's guard holding says nothing about the group, and a group without a guard of its own is not held."""
    checks = (cv("api"), cv("dep", Status.DOWN, critical=False, shared=True))
    groups = {"g": Group(aggregate(checks, 0.0, members=frozenset({"dep"})), frozenset({"dep"}))}
    holding = GuardView(state="held", serve=True, reasons=("dep",))
    shedding = GuardView(state="granted", serve=False, reasons=("dep",))
    s = snapshot(checks, groups)
    own = decide(s, replace(COND, guard=shedding, group_guards={"g": holding}), 0.1, "g")
    assert (own.held, own.healthy, own.note) == (True, True, holding.words())
    nodes = decide(s, replace(COND, guard=holding, group_guards={"g": shedding}), 0.1, "g")
    assert (nodes.held, nodes.healthy, nodes.down_reason) == (False, False, "dep: refused")
    none = decide(s, replace(COND, guard=holding, group_guards={}), 0.1, "g")
    assert (none.held, none.healthy) == (False, False)


def test_a_group_check_going_stale_after_the_snapshot_takes_the_group_down() -> None:
    """A group's member going stale after its snapshot takes the group down even when it is not critical."""
    checks = (cv("api", critical=False, fresh_until=1.0), cv("db"))
    groups = {"g": Group(aggregate(checks, 0.0, members=frozenset({"api"})), frozenset({"api"}))}
    assert decide(snapshot(checks, groups), COND, 0.1, "g").up
    a = decide(snapshot(checks, groups, computed_at=2.0), replace(COND, heartbeat=2.0), 2.0, "g")
    assert (a.up, a.down_reason) == (False, "api: stale: no fresh result")


def test_excluding_for_a_group_recomputes_that_group_only() -> None:
    """?exclude= on /health/<group> recomputes that group's verdict over its members; the node's verdict and
    the other groups stay as they were."""
    checks = (cv("a", Status.DOWN), cv("b", Status.DOWN, critical=False), cv("c"))
    g = Group(aggregate(checks, 0.0, members=frozenset({"a", "b"})), frozenset({"a", "b"}))
    h = Group(aggregate(checks, 0.0, members=frozenset({"c"})), frozenset({"c"}))
    s = snapshot(checks, {"g": g, "h": h})
    out = excluding(s, frozenset({"a"}), 0.1, "g")
    assert out.groups["g"].verdict == Verdict(False, "b: refused", ("b",))
    assert out.groups["g"].members == g.members
    assert out.groups["h"] is h and out.verdict == s.verdict and out.checks == s.checks
    assert excluding(s, frozenset({"a", "b"}), 0.1, "g").groups["g"].verdict == Verdict(False, NOTHING_CRITICAL)


def _answer(**kw) -> Answer:
    base = dict(fresh=True, live=True, healthy=True, up=True, code=200, state="up", reason="", down_reason="",
                agent_reason="", admin=Admin.READY, admin_reason="", failing=())
    return Answer(**{**base, **kw})


def test_health_and_live_responses() -> None:
    """/health says up only with 200 (a drained node's 404 says down); /live says live or stalled."""
    assert health_response(_answer()) == (200, "up\n")
    assert health_response(_answer(up=False, code=404)) == (404, "down\n")
    assert live_response(_answer()) == (200, "live\n")
    assert live_response(_answer(live=False)) == (503, "stalled\n")


def test_check_state_for_people() -> None:
    """A check's state reads unknown, up or down, and stale once its last result is too old."""
    assert check_state(cv("a", fresh_until=1.0), 1.0) == "up"
    assert check_state(cv("a", fresh_until=1.0), 1.5) == "stale"
    assert check_state(cv("a", Status.DOWN), 1.5) == "down"


def test_unknown_group_is_down_saying_so() -> None:
    """A group the config lacks is DOWN, naming it, from an agent that is otherwise fine."""
    reason = "unknown group 'nope'"
    assert unknown_group("nope") == Answer(
        fresh=True, live=True, healthy=False, up=False, code=503, state="down", reason=reason, down_reason=reason,
        agent_reason="", admin=Admin.READY, admin_reason="", failing=())


@pytest.mark.parametrize("answer, words, reason", [
    (_answer(), ("up", "ready"), ""),
    (_answer(up=False, admin=Admin.DRAIN, admin_reason="deploy 7"), ("up", "drain"), "deploy 7"),
    (_answer(up=False, admin=Admin.DRAIN), ("up", "drain"), "drain"),
    (_answer(up=False, healthy=False, admin=Admin.MAINT, admin_reason="kernel", down_reason="db: refused"),
     ("down", "maint"), "kernel; db: refused"),
    (_answer(up=False, healthy=False), ("down", "ready"), "down"),
    (_answer(held=True, note="held by the fleet guard"), ("up", "ready"), "held by the fleet guard"),
])
def test_agent_check_words_and_reason(answer: Answer, words: tuple[str, str], reason: str) -> None:
    """HAProxy's agent-check reply: the health and admin words, then the admin reason and why down or held."""
    assert agent_check_words(answer) == words
    assert agent_check_reason(answer) == reason


# -- agent/verdict.py: passing, stale, aggregate, Tally ----------------------------------------------

NO_FLAPS = PolicyConfig(flap_threshold=0)


def tcp(rise: int = 1, fall: int = 1, critical: bool = True, interval: float = 1.0) -> TcpConfig:
    return TcpConfig(name="c", type="tcp", port=1, rise=rise, fall=fall, critical=critical, interval=interval,
                     timeout=0.5)


def fold(samples: str, chk: TcpConfig, policy: PolicyConfig, times: list[float] | None = None) -> CheckState:
    """Feed '+' (pass) and '-' (fail) samples, at `times` or one a second; wall time is now + 1000."""
    state = CheckState()
    for i, s in enumerate(samples):
        t = float(i) if times is None else times[i]
        state = next_state(state, Result(s == "+", "" if s == "+" else f"boom {i}", "ok", 0.001, t, t, t + 1000),
                           chk, policy, t, t + 1000)
    return state


def test_history_keeps_the_newest_hundred_results() -> None:
    """The status page strip keeps the newest HISTORY results, oldest first."""
    state = fold("-" * 50 + "+" * 100, tcp(), NO_FLAPS)
    assert len(state.history) == HISTORY and all(state.history)
    state = fold("-" + "+" * (HISTORY - 1) + "+", tcp(), NO_FLAPS)
    assert state.history == (True,) * HISTORY


def test_transitions_record_when_and_why() -> None:
    """Going up or down records the monotonic and the wall time and the reason; rising clears a hold."""
    up = fold("+++", tcp(rise=3), NO_FLAPS)
    assert (up.status, up.changed_at, up.changed_wall, up.change_reason) == (Status.UP, 2.0, 1002.0,
                                                                            "passed 3 time(s) in a row")
    assert up.required_rise is None and up.ever_up
    down = fold("+++-", tcp(rise=3), NO_FLAPS)
    assert (down.status, down.changed_at, down.changed_wall, down.change_reason) == (Status.DOWN, 3.0, 1003.0,
                                                                                    "boom 3")
    first = fold("-", tcp(fall=2), NO_FLAPS)
    assert (first.status, first.change_reason) == (Status.DOWN, "boom 0")  # never up: down at once, plainly


def test_a_flap_exactly_one_window_after_the_first_does_not_count() -> None:
    """Flaps are counted within flap_window: one exactly a window later starts a new count."""
    policy = PolicyConfig(flap_threshold=2, flap_window=10.0, flap_hold=0.0)
    state = fold("+-+-", tcp(rise=1, fall=3), policy, times=[0.0, 1.0, 2.0, 11.0])
    assert state.status is Status.UP
    state = fold("+-+-", tcp(rise=1, fall=3), policy, times=[0.0, 1.0, 2.0, 10.9])
    assert state.status is Status.DOWN and state.change_reason.startswith("flapping: 2 failures")


def test_a_flapping_check_reaching_fall_gives_the_plain_reason() -> None:
    """A check that flaps and also fails `fall` times goes down with the failure's own reason."""
    state = fold("+-", tcp(rise=1, fall=1), PolicyConfig(flap_threshold=1, flap_hold=5.0))
    assert (state.status, state.change_reason, state.required_rise) == (Status.DOWN, "boom 1", 5)


def test_a_check_flapping_while_down_gets_the_hold_down() -> None:
    """A check already down that flaps again must pass for flap_hold before it may rise."""
    state = fold("+++-+-", tcp(rise=3, fall=1), PolicyConfig(flap_threshold=2, flap_window=100.0, flap_hold=10.0))
    assert (state.status, state.required_rise) == (Status.DOWN, 10)


@pytest.mark.parametrize("interval, hold, rise, required", [(2.0, 10.0, 1, 5), (4.0, 10.0, 1, 3), (2.0, 3.0, 4, 4)])
def test_the_hold_down_is_flap_hold_worth_of_samples(interval: float, hold: float, rise: int, required: int) -> None:
    """A flapping check must pass flap_hold / interval times in a row (rounded up), and at least `rise` times."""
    chk = tcp(rise=rise, fall=1, interval=interval)
    state = fold("+" * rise + "-", chk, PolicyConfig(flap_threshold=1, flap_hold=hold))
    assert (state.status, state.required_rise) == (Status.DOWN, required)


def test_rising_ends_the_hold_down() -> None:
    """Once a held-down check has risen, a later single failure (no longer flapping) needs only `rise` again."""
    policy = PolicyConfig(flap_threshold=2, flap_window=5.0, flap_hold=10.0)
    times = [0.0, 1.0, 2.0, 3.0, *(4.0 + i for i in range(10)), 30.0, 31.0]
    held = fold("+-+-" + "+" * 10, tcp(rise=1, fall=1), policy, times[:14])
    assert (held.status, held.required_rise) == (Status.UP, None)
    state = fold("+-+-" + "+" * 10 + "-+", tcp(rise=1, fall=1), policy, times)
    assert state.status is Status.UP


def test_view_carries_the_checks_config() -> None:
    """A view shows the check's type, threshold, rise, fall and interval; a given threshold is used as is."""
    chk = TcpConfig(name="c", type="tcp", port=1, rise=4, fall=3, interval=2.0, timeout=0.5)
    v = view(chk, CheckState(), NO_FLAPS)
    assert (v.type, v.threshold, v.rise, v.fall, v.interval) == ("tcp", chk.threshold(), 4, 3, 2.0)
    assert view(chk, CheckState(), NO_FLAPS, threshold="given").threshold == "given"


def test_a_result_is_fresh_up_to_and_including_fresh_until() -> None:
    """At fresh_until exactly a check is still fresh and passing; just after, stale and not passing."""
    v = cv("a", fresh_until=5.0)
    assert not stale(v, 5.0) and passing(v, 5.0)
    assert stale(v, 5.01) and not passing(v, 5.01)


def test_why_says_what_a_check_waits_for() -> None:
    """why(): no result yet, rising, recovering (with a flap hold-down), or the last failure's own reason."""
    rising = CheckView("a", "tcp", True, fold("+", tcp(rise=3), NO_FLAPS))
    assert why(rising, 0.0) == "rising: 1 pass(es) so far"
    assert why(CheckView("a", "tcp", True, CheckState()), 0.0) == "no result yet"
    recovering = CheckView("a", "tcp", True, fold("+-+", tcp(rise=3), NO_FLAPS))
    assert why(recovering, 0.0) == "recovering, 1 pass(es) so far; last failure: boom 1"
    held = CheckView("a", "tcp", True, fold("+-+", tcp(rise=1, fall=1), PolicyConfig(flap_threshold=1, flap_hold=10.0)))
    assert why(held, 2.0) == ("recovering, 1 pass(es) so far (flapping: held down until 10 in a row); "
                              "last failure: boom 1")
    again = CheckView("a", "tcp", True, fold("+--", tcp(rise=1, fall=1), NO_FLAPS))
    assert (again.state.change_reason, why(again, 0.0)) == ("boom 1", "boom 2")


def test_excluding_every_critical_check_leaves_nothing_to_vouch() -> None:
    """With every counted check excluded, nothing vouches for the node: DOWN, saying so."""
    checks = (cv("a"), cv("b"), cv("c", critical=False))
    assert aggregate(checks, 0.0, excluded=frozenset({"a", "b"})) == Verdict(False, NOTHING_CRITICAL)
    assert aggregate(checks, 0.0, excluded=frozenset({"a"})).up
    assert aggregate((), 0.0) == Verdict(False, NOTHING_CRITICAL)


def test_a_groups_members_count_whether_critical_or_not() -> None:
    """A verdict group counts exactly its members, critical or not."""
    checks = (cv("a", Status.DOWN), cv("b", critical=False), cv("c", Status.DOWN, critical=False))
    assert aggregate(checks, 0.0, members=frozenset({"b"})).up
    assert aggregate(checks, 0.0, members=frozenset({"c"})).failing == ("c",)


TALLY_STEPS = [  # (now, the new view or None, the verdict then)
    (1.0, None, Verdict(True, "", until=10.0)),
    (2.0, cv("a", Status.DOWN), Verdict(False, "a: refused", ("a",))),
    (3.0, cv("c", Status.DOWN), Verdict(False, "a: refused (+1 more)", ("a", "c"))),
    (4.0, cv("a", fresh_until=50.0), Verdict(False, "c: refused", ("c",))),
    (5.0, cv("c", fresh_until=60.0), Verdict(True, "", until=20.0)),
    (21.0, None, Verdict(False, "b: stale: no fresh result", ("b",))),
    (22.0, cv("b", fresh_until=70.0), Verdict(True, "", until=50.0)),  # c's superseded entry (30) is no expiry
    (23.0, cv("c", Status.DOWN, shared=True), Verdict(False, "c: refused", ("c",), shared_only=True)),
    (24.0, cv("b", Status.DOWN), Verdict(False, "b: refused (+1 more)", ("b", "c"))),
]


def test_tally_follows_a_script_of_results_as_aggregate_does() -> None:
    """A Tally fed one view at a time gives the verdict aggregate() gives over the latest views: up until the
    first passing check goes stale, else the failing checks in config order, the first one's reason first."""
    latest = {v.name: v for v in (cv("a", fresh_until=10.0), cv("b", fresh_until=20.0), cv("c", fresh_until=30.0),
                                  cv("d", Status.DOWN, critical=False))}
    tally = Tally(latest.values())
    for now, new, expected in TALLY_STEPS:
        if new is not None:
            latest[new.name] = new
            tally.update(new)
        assert tally.verdict(now) == expected, now
        assert aggregate(latest.values(), now) == expected, now


def test_tally_with_nothing_counted_is_down_saying_so() -> None:
    """A Tally with no counted check is down with the same reason as aggregate()."""
    assert Tally([cv("a", critical=False)]).verdict(0.0) == Verdict(False, NOTHING_CRITICAL)


def test_tally_says_when_the_next_passing_check_goes_stale() -> None:
    """next_expiry() is the earliest fresh_until of a passing check, and the check still passes at it."""
    t = Tally([cv("a", fresh_until=7.0), cv("b", fresh_until=9.0)])
    assert t.next_expiry() == 7.0
    assert t.verdict(7.0) == Verdict(True, "", until=7.0)
    assert t.verdict(7.5).failing == ("a",)
    assert Tally([cv("a", Status.DOWN)]).next_expiry() == math.inf


# -- agent/admin.py: the drain/maint record -----------------------------------------------------------


@pytest.mark.parametrize("text, seconds", [("10m", 600.0), ("0.5s", 0.5), ("8760h", 8760 * 3600.0)])
def test_for_takes_a_positive_duration_up_to_a_year(text: str, seconds: float) -> None:
    """--for and ?for= take any positive duration up to MAX_FOR."""
    assert parse_for(text) == seconds


@pytest.mark.parametrize("text, message", [
    ("0s", "must be a positive duration such as 10m"),
    ("8761h", "must be at most 8760h"),
    ("soon", "'soon' is not a duration: use a number of seconds or 500ms, 2s, 1m, 1h"),
])
def test_for_refuses_nothing_too_long_and_nonsense(text: str, message: str) -> None:
    """A zero, a longer-than-MAX_FOR or a malformed --for is refused in the user's words."""
    with pytest.raises(ValueError) as refused:
        parse_for(text)
    assert str(refused.value) == message


def test_an_unknown_groups_record_is_ready() -> None:
    """A group without an entry of its own is ready."""
    assert AdminRecord(Admin.DRAIN).group("nope") is READY


def test_with_group_drops_expired_entries_and_ready_removes_one() -> None:
    """Setting a group's state drops entries expired at `wall`; setting ready removes that group's entry."""
    current = AdminRecord(Admin.READY, groups=(("old", AdminRecord(Admin.DRAIN, until=50.0)),
                                               ("web", AdminRecord(Admin.MAINT, until=500.0))))
    out = current.with_group("api", AdminRecord(Admin.DRAIN, "x"), 100.0)
    assert [g for g, _ in out.groups] == ["api", "web"]
    assert [g for g, _ in out.with_group("web", READY, 100.0).groups] == ["api"]


def test_make_record_defaults_and_times() -> None:
    """A record has no reason or source unless given, is set at `wall` (now by default), and expires after
    `duration`."""
    r = make_record(Admin.DRAIN, wall=5.0)
    assert (r.reason, r.source, r.set_at, r.until) == ("", "", 5.0, None)
    assert make_record(Admin.MAINT, "kernel", 60, source="cli", wall=5.0) == AdminRecord(Admin.MAINT, "kernel", 65.0,
                                                                                        5.0, "cli")
    before = time.time()
    r = make_record(Admin.DRAIN, duration=60)
    assert before <= r.set_at <= time.time() and r.until == r.set_at + 60


def test_the_state_file_is_indented_json_for_people() -> None:
    """The state file is JSON indented by two spaces, one key a line, ending in a newline."""
    text = encode(AdminRecord(Admin.DRAIN, "deploy")).decode()
    assert text.startswith('{\n  "admin": "drain",\n  "reason": "deploy",\n') and text.endswith("}\n")


@pytest.mark.parametrize("content, expected", [
    (b'{"admin": "drain", "until": 0, "set_at": 0.5}', AdminRecord(Admin.DRAIN, "", 0.0, 0.5)),  # the epoch is a time
    (b'{"admin": "maint"}', AdminRecord(Admin.MAINT)),  # no reason: none
    (b'{"admin": "drain", "source": "' + b"s" * 30 + b'"}', AdminRecord(Admin.DRAIN, source="s" * 17 + "...")),
])
def test_state_file_fields(tmp_path: Path, content: bytes, expected: AdminRecord) -> None:
    """Times from the epoch on are usable, a missing reason is empty, a source is cut to 20 characters."""
    state_path(tmp_path).write_bytes(content)
    assert read_record(state_path(tmp_path)) == expected


@pytest.mark.parametrize("content, reason", [
    (b'{"admin": "ready", "groups": {"api": [1]}}', "groups.api: not a JSON object"),
    (b'{"admin": "ready", "groups": {"' + b"!" * 100 + b'": {}}}', "groups: '" + "!" * 67 + "...' is not a group name"),
])
def test_bad_group_entries_are_named(tmp_path: Path, content: bytes, reason: str) -> None:
    """A bad group entry is named by key path; a bad group name is quoted, cut to 70 characters."""
    path = state_path(tmp_path)
    path.write_bytes(content)
    record = read_record(path)
    assert (record.admin, record.source, record.reason) == (Admin.MAINT, "agent", f"state file {path} invalid: {reason}")


def test_an_unreadable_state_file_is_the_agents_own_maintenance(tmp_path: Path) -> None:
    """The maintenance an unreadable file imposes is marked as the agent's, not an operator's."""
    state_path(tmp_path).mkdir()
    assert read_record(state_path(tmp_path)).source == "agent"


def test_a_node_command_keeps_the_groups_in_force_at_its_own_time() -> None:
    """A node command keeps the group entries still in force at the time it was set; a made-up record's
    entries are not carried."""
    record = AdminRecord(Admin.DRAIN, "deploy", set_at=1000.0, source="cli")
    groups = (("api", AdminRecord(Admin.DRAIN, until=1500.0)), ("old", AdminRecord(Admin.DRAIN, until=900.0)))
    kept = keeping_groups(record)(AdminRecord(Admin.READY, groups=groups, source="cli"))
    assert [g for g, _ in kept.groups] == ["api"]
    made_up = AdminRecord(Admin.MAINT, "state file invalid", groups=groups, source="agent")
    assert keeping_groups(record)(made_up).groups == ()


def test_a_group_command_replaces_its_entry_at_its_own_time() -> None:
    """A group command sets that group's entry (with no groups of its own), dropping entries expired when it
    was set; on the agent's made-up record it is refused, saying how to fix it."""
    entry = AdminRecord(Admin.DRAIN, "reindex", set_at=1000.0, source="cli",
                        groups=(("x", AdminRecord(Admin.MAINT)),))
    current = AdminRecord(Admin.READY, groups=(("old", AdminRecord(Admin.DRAIN, until=900.0)),
                                               ("web", AdminRecord(Admin.MAINT, until=1500.0))))
    out = setting_group("api", entry)(current)
    assert [g for g, _ in out.groups] == ["api", "web"]
    assert out.group("api").groups == () and out.group("api").reason == "reindex"
    with pytest.raises(AdminWriteError) as refused:
        setting_group("api", entry)(AdminRecord(Admin.MAINT, "state file invalid", source="agent"))
    assert str(refused.value) == ("state file invalid; run `healthgate ready` (or maint) for the node first, "
                                  "which rewrites it")


# -- agent/serving/admin_watch.py: the record in force at a given wall time ------------------------


@pytest.fixture
def watcher(tmp_path: Path) -> AdminWatcher:
    state = AgentState(parse_config({"agent": {"state_dir": str(tmp_path)}, "checks": [PASSING]}), 0.0)
    return AdminWatcher(state)


def put(w: AdminWatcher, record: AdminRecord, wall: float) -> tuple[Admin, str, float | None]:
    w.record = record
    w.apply(wall)
    return w.state.admin, w.state.admin_reason, w.state.admin_until


async def test_a_record_is_in_force_until_it_expires(watcher: AdminWatcher) -> None:
    """A drain is in force until its `until`, then the node is ready, saying how long the drain lasted; a
    ready record afterwards keeps that explanation on display."""
    drain = AdminRecord(Admin.DRAIN, "deploy", until=200.0, set_at=100.0, source="cli")
    assert put(watcher, drain, 199.0) == (Admin.DRAIN, "deploy", 200.0)
    assert put(watcher, drain, 200.0) == (Admin.READY, "drain expired after 100s", None)
    assert put(watcher, AdminRecord(Admin.READY, source="cli"), 201.0) == (Admin.READY, "drain expired after 100s", None)
    assert put(watcher, AdminRecord(Admin.MAINT, until=300.0), 250.0)[0] is Admin.MAINT
    assert put(watcher, AdminRecord(Admin.MAINT, until=300.0), 300.0) == (Admin.READY, "maint expired after its time",
                                                                           None)


async def test_an_expiry_says_how_long_the_state_lasted_to_the_millisecond(watcher: AdminWatcher) -> None:
    """The expiry's explanation gives the duration rounded to milliseconds."""
    drain = AdminRecord(Admin.DRAIN, "deploy", until=190.5004, set_at=100.0, source="http")
    put(watcher, drain, 150.0)
    assert put(watcher, drain, 191.0) == (Admin.READY, "drain expired after 90.5s", None)


@pytest.mark.parametrize("record, reason", [
    (AdminRecord(Admin.READY, source="cli"), "ready (cli)"),
    (AdminRecord(Admin.READY), "ready"),
    (AdminRecord(Admin.READY, "all done", source="http"), "all done"),
])
async def test_ready_after_maintenance_says_who(watcher: AdminWatcher, record: AdminRecord, reason: str) -> None:
    """Leaving drain or maintenance says why: the record's reason, else who made the node ready."""
    put(watcher, AdminRecord(Admin.MAINT, "kernel"), 0.0)
    assert put(watcher, record, 1.0) == (Admin.READY, reason, None)


async def test_group_states_in_force(watcher: AdminWatcher) -> None:
    """The groups' drain and maintenance are put in force until they expire; a ready entry is none."""
    groups = (("api", AdminRecord(Admin.DRAIN, "reindex", until=100.0)), ("old", AdminRecord(Admin.MAINT, until=50.0)),
              ("web", AdminRecord(Admin.READY)))
    put(watcher, AdminRecord(Admin.READY, groups=groups), 50.0)
    assert watcher.state.group_admin == {"api": (Admin.DRAIN, "reindex", 100.0)}
    put(watcher, AdminRecord(Admin.READY, groups=groups), 100.0)
    assert watcher.state.group_admin == {}



class Armed:
    armed = True  # an inotify watch in place: the watcher's own looks are 10 s apart


def _beats_to_a_look(w: AdminWatcher, now: float, wall: float, monkeypatch) -> bool:
    """Whether a heartbeat at loop time `now` and wall time `wall` asks the watcher for a look."""
    monkeypatch.setattr(admin_watch.time, "time", lambda: wall)
    w._due.clear()
    w.beat(now)
    return w._due.is_set()


@pytest.mark.parametrize("record", [
    AdminRecord(Admin.DRAIN, "deploy", until=130.0),
    AdminRecord(Admin.READY, groups=(("api", AdminRecord(Admin.MAINT, until=130.0)),
                                     ("web", AdminRecord(Admin.MAINT)))),
])
async def test_a_for_runs_out_on_time_while_inotify_spaces_the_looks(watcher: AdminWatcher, record, monkeypatch) -> None:
    """With the file watched, looks come every SAFETY_POLL; a `--for` (the node's or a group's) still ends
    on time: the first heartbeat at or after its `until` asks for a look, none before it does."""
    watcher._watch, watcher._looked_with = Armed(), watcher.state.config  # watched, and looked at already
    put(watcher, record, 100.0)
    assert _beats_to_a_look(watcher, 0.0, 100.0, monkeypatch)  # the first beat: a look is due anyway
    assert not _beats_to_a_look(watcher, 1.0, 129.9, monkeypatch)  # the next one is SAFETY_POLL away
    assert _beats_to_a_look(watcher, 1.1, 130.0, monkeypatch)  # ...but the --for has run out


@pytest.mark.parametrize("record", [
    AdminRecord(Admin.MAINT, "kernel"),  # no --for: nothing runs out
    AdminRecord(Admin.READY, until=130.0),  # ready needs no expiry
    AdminRecord(Admin.DRAIN, until=100.0),  # run out already when applied
])
async def test_nothing_to_run_out_asks_for_no_early_look(watcher: AdminWatcher, record, monkeypatch) -> None:
    """Without a `--for` in force, in the future, a heartbeat asks for no look before SAFETY_POLL."""
    watcher._watch, watcher._looked_with = Armed(), watcher.state.config  # watched, and looked at already
    put(watcher, record, 100.0)
    assert _beats_to_a_look(watcher, 0.0, 100.0, monkeypatch)
    assert not _beats_to_a_look(watcher, 1.0, 200.0, monkeypatch)


@pytest.mark.parametrize("x, tidied", [
    (37.58291015625, 37.5829), (0.000123456789, 0.000123457), (0.003000000000156433, 0.003),
    (999.99949, 999.999), (1000.00049, 1000.0), (1000.5678, 1000.568), (1764650000.123456, 1764650000.123), (-1234.56789, -1234.568),
    (-0.1234567, -0.123457), (12, 12), (True, True), (float("inf"), float("inf")), (float("-inf"), float("-inf")),
])
def test_tidy_keeps_six_significant_digits_or_milliseconds(x, tidied) -> None:
    """Floats lose their noise: six significant digits below 1000, milliseconds from 1000 on (timestamps);
    integers, booleans and infinities pass as they are, with their type."""
    out = tidy(x)
    assert out == tidied and type(out) is type(tidied)


def test_tidy_leaves_nan_and_tidies_every_float_inside() -> None:
    nan = tidy(float("nan"))
    assert nan != nan
    assert tidy_all({"a": [0.30000000000000004, (1.0000001, "x")], "b": {"c": 2.50000001}, "d": 3, "e": None}) == \
        {"a": [0.3, [1.0, "x"]], "b": {"c": 2.5}, "d": 3, "e": None}
    assert tidy_all(0.1 + 0.2) == 0.3 and tidy_all("0.30000000000000004") == "0.30000000000000004"

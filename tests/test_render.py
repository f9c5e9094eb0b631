"""Terminal rendering of /status JSON, and the headroom observations it relies on, as tables."""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

import pytest

from agent.cli import render
from agent.model import Observation
from agent.probes import disk, memory
from agent.probes.base import Context, headroom
from agent.runner import _valid
from agent.text import tidy

NOW = "2026-11-29T12:00:00.000Z"
ANSI = re.compile(r"\033\[[0-9;]*m")


def entry(name: str, type_: str = "tcp", *, ok: bool = True, critical: bool = True, **kw) -> dict:
    e = {
        "componentId": name, "componentType": type_, "status": "pass" if ok else "fail", "critical": critical,
        "state": "up" if ok else "down", "threshold": kw.pop("threshold", "connect 127.0.0.1:5432"),
        "consecutiveSuccesses": 5 if ok else 0, "consecutiveFailures": 0 if ok else 3,
        "lastTransition": "2026-11-29T11:55:00.000Z", "lastTransitionReason": kw.pop("why_changed", "passed 2 time(s) in a row"),
        "history": "+++++" if ok else "++---", "rise": 2, "fall": 2, "intervalSeconds": 2.0,
        "time": "2026-11-29T11:59:59.000Z", "durationSeconds": 0.0012,
    }
    if not ok:
        e["output"] = kw.pop("output", "tcp 127.0.0.1:5432: connection refused")
    e.update(kw)
    return e


def status(*entries: dict, state: str = "up", output: str = "", admin: str = "ready", **hg) -> dict:
    return {
        "status": "pass" if state == "up" else "fail", "serviceId": "web-1", "output": output, "releaseId": "0.1.0",
        "healthgate": {"verdict": "up" if state in ("up", "drain", "maint") else "down", "admin": admin,
                       "adminReason": hg.pop("adminReason", ""), "adminUntil": hg.pop("adminUntil", None),
                       "since": "2026-11-29T11:55:00.000Z", "state": state, "time": NOW, **hg},
        "checks": {f"{e['componentId']}:{e['componentType']}": [e] for e in entries},
    }


MEM = entry("mem", "memory", threshold="used <= 95%", observedValue=91.0, observedUnit="percent",
            detail="91.0% used", headroom=0.0421)
DISK = entry("root", "disk", threshold="free >= 5%", observedValue=50.0, observedUnit="percent",
             detail="50.0% free", headroom=0.4737)
DB_DOWN = entry("db", ok=False, why_changed="tcp 127.0.0.1:5432: connection refused")


def test_check_rows_match_the_page_columns() -> None:
    """Each check becomes one row: status, observed value, threshold, latency, streaks, age, history, reason."""
    rows = render.check_rows(status(MEM, DB_DOWN, state="down"), history=4)
    assert rows == [
        render.HEADER,
        ("mem", "memory", "yes", "UP", "91.0% used", "used <= 95%", "1.2 ms", "5/0", "5m 0s ago", "++++", ""),
        ("db", "tcp", "yes", "DOWN", "—", "connect 127.0.0.1:5432", "1.2 ms", "0/3", "5m 0s ago", "+---",
         "tcp 127.0.0.1:5432: connection refused"),
    ]


@pytest.mark.parametrize("extra, pill", [
    ({"state": "stale"}, "STALE"), ({"state": "unknown"}, "UNKNOWN"), ({}, "DOWN"),
])
def test_pill(extra: dict, pill: str) -> None:
    """A check's status word is the page's: STALE and UNKNOWN before DOWN."""
    assert render.pill({**DB_DOWN, **extra}) == pill


@pytest.mark.parametrize("seconds, text", [
    (None, "—"), (0.0, "<1 ms"), (0.00042, "420 µs"), (0.0042, "4.2 ms"), (0.042, "42 ms"), (4.2, "4.2 s"),
    (0.0009999, "1 ms"), (0.001, "1 ms"), (0.0012345, "1.23 ms"), (0.9996, "1 s"), (1.5, "1.5 s"),
    (0.000000512, "0.512 µs"), (125.4, "125 s"), (3600.0, "3600 s"),
])
def test_seconds(seconds: float | None, text: str) -> None:
    """Latencies read as the status page writes them, in the unit they round to: 1 ms, never 1000 µs."""
    assert render.seconds(seconds) == text


@pytest.mark.parametrize("e, text", [
    ({"observedValue": 0.0123, "observedUnit": "seconds"}, "12.3 ms"),
    ({"observedValue": 3 * 1024**3, "observedUnit": "bytes"}, "3.0 GiB"),
    ({"observedValue": 12.5, "observedUnit": "percent"}, "12.5%"),
    ({"observedValue": 7, "observedUnit": "items"}, "7 items"),
    ({"detail": "no value"}, "no value"),
    ({}, "—"),
])
def test_value(e: dict, text: str) -> None:
    """Observed values get human units."""
    assert render.value(e) == text


def test_table_colours_only_when_asked() -> None:
    """Plain text has no escape codes; colour marks status and history and keeps the columns aligned."""
    rows = render.check_rows(status(MEM, DB_DOWN, state="down"))
    plain = render.table(rows, color=False)
    coloured = render.table(rows, color=True)
    assert "\033[" not in plain
    assert render.GREEN + "UP" in coloured and render.RED + "DOWN" in coloured
    assert ANSI.sub("", coloured) == plain


LONG = entry("cache", "redis", ok=False, threshold="PING answered, not loading",
             output="redis 127.0.0.1:6390: connection refused after 3 attempts; " * 2 + "then gave up")


@pytest.mark.parametrize("width", [80, 100, 120])
def test_table_fits_the_terminal_and_cuts_with_an_ellipsis(width: int) -> None:
    """Cut to the terminal's width, every line fits; what is cut ends in an ellipsis, and the reason of a
    failing check keeps its start; without a width (--wide) every column and the whole reason are there."""
    rows = render.check_rows(status(MEM, DISK, LONG, state="down"))
    lines = render.table(rows, color=False, width=width).splitlines()
    assert all(len(line) <= width for line in lines), lines
    assert lines[0].split()[:2] == ["CHECK", "STATUS"] and lines[0].split()[-1] == "REASON"
    cache = next(line for line in lines if line.startswith("cache"))
    assert cache.endswith(render.ELLIPSIS) and "redis 127.0.0.1:6390: connection refused" in cache
    wide = render.table(rows, color=False).splitlines()
    assert wide[0].split() == list(render.HEADER) and wide[3].endswith(LONG["output"])


def test_a_table_that_fits_is_not_cut() -> None:
    """A table narrower than the terminal keeps every column and every character."""
    rows = render.check_rows(status(MEM, DB_DOWN, state="down"))
    assert render.table(rows, color=False, width=200) == render.table(rows, color=False)


def test_cut_table_keeps_its_colours() -> None:
    """Narrowed, the status and reason are still coloured, and the colours change nothing else."""
    rows = render.check_rows(status(MEM, LONG, state="down"))
    coloured = render.table(rows, color=True, width=80)
    assert render.RED + "DOWN" in coloured and ANSI.sub("", coloured) == render.table(rows, color=False, width=80)


def test_status_report_cuts_transitions_to_the_width() -> None:
    """The transitions' reasons are cut to the width too; --wide keeps them whole."""
    journal = {"entries": [{"time": "2026-11-29T11:55:00.000Z", "kind": "check", "name": "cache", "from": "up",
                            "to": "down", "reason": LONG["output"]}]}
    st = status(MEM, LONG, state="down", output="cache: " + LONG["output"])
    narrow = render.status_report(st, journal, color=False, width=80).splitlines()
    assert len(narrow[-1]) <= 80 and narrow[-1].endswith(render.ELLIPSIS)
    assert render.status_report(st, journal, color=False).splitlines()[-1].endswith(LONG["output"])


@pytest.mark.parametrize("x, tidied", [
    (37.58291015625, 37.5829), (0.000123456789, 0.000123457), (1764652012.345678, 1764652012.346), (2.0, 2.0),
    (7, 7), (0.1 + 0.2, 0.3), (123456.78901, 123456.789),
])
def test_json_numbers_carry_no_float_noise(x: float, tidied: float) -> None:
    """Numbers in JSON keep six significant digits, and timestamps (1000 and up) their milliseconds."""
    assert tidy(x) == tidied and type(tidy(x)) is type(x)


@pytest.mark.parametrize("choice, tty, no_color, want", [
    ("auto", True, None, True), ("auto", True, "1", False), ("auto", True, "", True), ("auto", False, None, False),
    ("always", False, "1", True), ("never", True, None, False),
])
def test_use_color(monkeypatch, choice: str, tty: bool, no_color: str | None, want: bool) -> None:
    """Colour on a terminal unless NO_COLOR is set and non-empty; --color always/never override."""
    if no_color is None:
        monkeypatch.delenv("NO_COLOR", raising=False)
    else:
        monkeypatch.setenv("NO_COLOR", no_color)
    stream = io.StringIO()
    stream.isatty = lambda: tty
    assert render.use_color(choice, stream) is want


def test_status_report() -> None:
    """The report opens like the page's banner, then the table, then transitions newest first."""
    journal = {"entries": [
        {"time": "2026-11-29T11:55:00.000Z", "kind": "check", "name": "db", "from": "up", "to": "down",
         "reason": "tcp 127.0.0.1:5432: connection refused", "critical": True},
        {"time": "2026-11-29T11:55:00.100Z", "kind": "verdict", "name": "node", "from": "up", "to": "down",
         "reason": "db: tcp 127.0.0.1:5432: connection refused"},
    ]}
    out = render.status_report(status(MEM, DB_DOWN, state="down", output="db: tcp 127.0.0.1:5432: connection refused"),
                               journal, color=False).splitlines()
    assert out[0] == "DOWN  web-1  since 11:55:00 UTC (for 5m 0s)"
    assert out[1] == "db: tcp 127.0.0.1:5432: connection refused"
    assert out[3].split()[:4] == ["CHECK", "TYPE", "CRIT", "STATUS"]  # no width: every column
    assert out[-3] == "RECENT TRANSITIONS (UTC, newest first)"
    assert out[-2].split()[:6] == ["11:55:00", "verdict", "node", "up", "->", "down"]
    assert out[-1].startswith("11:55:00  check    db")


@pytest.mark.parametrize("state, code", [("up", 0), ("down", 2), ("drain", 2), ("maint", 2)])
def test_exit_code(state: str, code: int) -> None:
    """status and explain exit 0 only when the node is served up."""
    assert render.exit_code(status(MEM, state=state)) == code


EXPLAIN = [
    pytest.param(
        status(MEM, DB_DOWN, state="down", output="db: tcp 127.0.0.1:5432: connection refused"),
        "web-1 is DOWN since 11:55:00 UTC (5m 0s ago) because 1 critical check fails: db (tcp): tcp 127.0.0.1:5432: "
        "connection refused (3 failures in a row, down for 5m 0s; it needs 2 passes in a row to rise). It comes "
        "back UP after 2 more passing samples in a row of db (sampled every 2s).",
        id="down-one-check"),
    pytest.param(
        status(MEM, {**DB_DOWN, "consecutiveSuccesses": 1, "consecutiveFailures": 0, "rise": 3}, state="down"),
        "web-1 is DOWN since 11:55:00 UTC (5m 0s ago) because 1 critical check fails: db (tcp) is recovering: it "
        "passed 1 of the 3 samples in a row it needs (it had failed with: tcp 127.0.0.1:5432: connection refused). "
        "It comes back UP after 2 more passing samples in a row of db (sampled every 2s).",
        id="down-recovering"),
    pytest.param(
        status(DB_DOWN, entry("cache", ok=False, output="redis: timeout"), state="down"),
        "web-1 is DOWN since 11:55:00 UTC (5m 0s ago) because 2 critical checks fail: db (tcp): tcp 127.0.0.1:5432: "
        "connection refused (3 failures in a row, down for 5m 0s; it needs 2 passes in a row to rise); cache (tcp): "
        "redis: timeout (3 failures in a row, down for 5m 0s; it needs 2 passes in a row to rise). It comes back UP "
        "once every one of them passes its rise count in a row.",
        id="down-two-checks"),
    pytest.param(
        status(MEM, state="down", output="shutting down"),
        "web-1 is DOWN since 11:55:00 UTC (5m 0s ago): shutting down. No critical check is failing: the agent itself "
        "cannot vouch for the node (it is starting, stopping or its event loop is stalled), and fails closed.",
        id="down-agent"),
    pytest.param(
        status(DISK, MEM, {**DB_DOWN, "critical": False}),
        "web-1 is UP since 11:55:00 UTC (5m 0s ago): 2 critical checks pass. Closest to its threshold: mem (memory) "
        "at 91.0% used against used <= 95%, 4% headroom left; 2 failing samples in a row would take the node down. "
        "Not critical, so not counted: db is failing.",
        id="up-headroom"),
    pytest.param(
        status(MEM, {**entry("db"), "consecutiveFailures": 1, "consecutiveSuccesses": 0, "output": "tcp: refused"}),
        "web-1 is UP since 11:55:00 UTC (5m 0s ago): 2 critical checks pass. Closest to taking it down: db (tcp) has "
        "failed 1 of the 2 samples in a row that would take it down: tcp: refused.",
        id="up-one-failure-away"),
    pytest.param(
        status(DISK, {**entry("db"), "history": "+-+-+++"}),
        "web-1 is UP since 11:55:00 UTC (5m 0s ago): 2 critical checks pass. Closest to its threshold: root (disk) "
        "at 50.0% free against free >= 5%, 47% headroom left; 2 failing samples in a row would take the node down. "
        "Recently unsteady: db (tcp): 2 of its last 7 samples failed, the last change 5m 0s ago (passed 2 time(s) "
        "in a row).",
        id="up-headroom-and-flaky"),
    pytest.param(
        status(entry("api"), {**entry("db"), "history": "+-++++"}),
        "web-1 is UP since 11:55:00 UTC (5m 0s ago): 2 critical checks pass. No critical check reports how close it "
        "is to a threshold; the shakiest is db (tcp): 1 of its last 6 samples failed, the last change 5m 0s ago "
        "(passed 2 time(s) in a row); 2 failures in a row would take the node down.",
        id="up-fallback-failures"),
    pytest.param(
        status(entry("api"), {**entry("db"), "consecutiveSuccesses": 2}),
        "web-1 is UP since 11:55:00 UTC (5m 0s ago): 2 critical checks pass. No critical check reports how close it "
        "is to a threshold, and none failed in its last samples; the one with the fewest passes in a row is db "
        "(tcp, 2).",
        id="up-fallback-passes"),
    pytest.param(
        status({**DB_DOWN, "critical": False}),
        "web-1 is UP since 11:55:00 UTC (5m 0s ago): 0 critical checks pass. It has no critical checks, so only "
        "drain, maintenance or the agent's own health can take it down. Not critical, so not counted: db is failing.",
        id="up-no-critical"),
    pytest.param(
        status(MEM, state="drain", admin="drain", adminReason="deploy 4711", output="drain: deploy 4711",
               adminUntil="2026-11-29T12:30:00.000Z"),
        "web-1 is out of the pool by an operator: DRAIN (deploy 4711) since 11:55:00 UTC (5m 0s ago) until 12:30:00 "
        "UTC. Its critical checks pass; it serves UP again once set back to ready. Closest to its threshold: mem "
        "(memory) at 91.0% used against used <= 95%, 4% headroom left; 2 failing samples in a row would take the "
        "node down.",
        id="drain"),
]


@pytest.mark.parametrize("st, text", EXPLAIN)
def test_explain(st: dict, text: str) -> None:
    """explain answers in one paragraph: why down now, or what would take the node down next."""
    assert render.explain(st) == text


@pytest.mark.parametrize("value, limit, best, want", [
    (0.0, 95.0, 0.0, 1.0),      # memory: nothing used
    (47.5, 95.0, 0.0, 0.5),
    (95.0, 95.0, 0.0, 0.0),     # at the threshold
    (100.0, 80.0, 0.0, -0.25),  # past it
    (100.0, 5.0, 100.0, 1.0),   # disk: all free
    (52.5, 5.0, 100.0, 0.5),
    (2.5, 5.0, 100.0, -0.0263),
    (50.0, 100.0, 100.0, None),  # a degenerate bound says nothing
])
def test_headroom(value: float, limit: float, best: float, want: float | None) -> None:
    """headroom() is the fraction of the way from the ideal reading to the threshold still left, both directions."""
    assert headroom(value, limit, best) == want


async def test_memory_observation_has_headroom(tmp_path: Path) -> None:
    """The memory probe reports its headroom against max_used_percent."""
    (tmp_path / "meminfo").write_text("MemTotal: 1000 kB\nMemFree: 100 kB\nMemAvailable: 400 kB\n")
    cfg = memory.Config(type="memory", name="mem", max_used_percent=80)
    obs = await memory.probe(cfg, Context(proc=tmp_path))
    assert obs.value == 60.0 and obs.headroom == 0.25


async def test_disk_headroom_is_the_tightest_bound(tmp_path: Path) -> None:
    """With a free-bytes bound tighter than the percent bound, the disk probe's headroom is the bytes one."""
    st = os.statvfs(tmp_path)
    free, total = st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
    cfg = disk.Config(type="disk", name="d", path=str(tmp_path), min_free_percent=0, min_free_bytes=int(free * 0.9))
    obs = await disk.probe(cfg, Context())
    assert obs.headroom == pytest.approx((free - 0.9 * free) / (total - 0.9 * free), abs=0.01)
    loose = await disk.probe(cfg.model_copy(update={"min_free_bytes": 0}), Context())
    assert loose.headroom == pytest.approx(free / total, abs=0.01)


@pytest.mark.parametrize("obs, ok", [
    (Observation(1.0, headroom=0.5), True), (Observation(1.0), True),
    (Observation(1.0, headroom=float("nan")), False), (Observation(1.0, headroom=float("inf")), False),
])
def test_runner_rejects_non_finite_headroom(obs: Observation, ok: bool) -> None:
    """A probe's headroom must be a finite number or absent, like its value."""
    assert _valid(obs) is ok


def _group(state: str = "up", *, checks=("mem",), failing=(), output: str = "", admin: str = "ready",
           reason: str = "", until: str | None = None) -> dict:
    return {"status": "pass" if state == "up" else "fail", "state": state, "output": output,
            "failing": list(failing), "checks": list(checks), "admin": admin, "adminReason": reason,
            "adminUntil": until}


def test_group_rows_show_verdict_admin_checks_and_reason() -> None:
    """One row per group: UP/DOWN from its checks, its own admin state with the expiry, its members, and why
    it is not served up (its failing check, its own reason, or the node's drain)."""
    s = status(MEM, DB_DOWN, state="down", output="db: refused")
    s["groups"] = {"api": _group("down", checks=("db", "mem"), failing=("db",), output="db: refused"),
                   "static": _group("drain", output="drain: reindex", admin="drain", reason="reindex",
                                    until="2026-11-29T12:30:00.000Z"),
                   "web": _group("maint", output="maint: node upgrade")}
    assert render.group_rows(s) == [
        render.GROUP_HEADER,
        ("api", "DOWN", "ready", "db, mem", "db: refused"),
        ("static", "UP", "drain until 12:30:00", "mem", "reindex"),
        ("web", "UP", "ready", "mem", "node maint: node upgrade"),
    ]


def test_group_table_fits_100_columns() -> None:
    """Long names, admin states, member lists and reasons are cut with "…" so that no line reaches 100
    columns; colour marks the verdict."""
    long = "x" * 60
    s = status(MEM)
    s["groups"] = {long: _group("down", checks=[f"check{i}" for i in range(20)], output="boom " * 40,
                                admin="maint", until="2026-12-01T12:30:00.000Z")}
    plain = render.group_table(render.group_rows(s), False)
    assert all(len(line) < 100 for line in plain.splitlines()) and "…" in plain
    coloured = render.group_table(render.group_rows(s), True)
    assert render.RED + "DOWN" in coloured
    assert [ANSI.sub("", line) for line in coloured.splitlines()] == plain.splitlines()


def test_explain_group_says_why_a_group_is_down() -> None:
    """explain --group names the group's failing checks, counted critical or not, and what brings it back."""
    s = status(MEM, DB_DOWN, state="down", output="db: refused")
    s["groups"] = {"api": _group("down", checks=("db",), failing=("db",), output="db: refused")}
    text = render.explain_group(s, "api")
    assert text.startswith("Group api on web-1 is DOWN because 1 check fails: db (tcp): tcp 127.0.0.1:5432:")
    assert "It comes back UP after 2 more passing samples in a row of db" in text
    assert render.group_exit_code(s, "api") == 2


def test_table_takes_rows_of_any_header() -> None:
    """table() lays out, narrows and colours any rows by their header's names, not only the checks table."""
    rows = [("GROUP", "STATUS", "CHECKS"), ("api", "DOWN", "db, cache"), ("static", "UP", "disk")]
    coloured = render.table(rows, color=True, width=80)
    assert render.RED + "DOWN" in coloured and ANSI.sub("", coloured) == render.table(rows, color=False)

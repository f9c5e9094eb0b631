"""Terminal views of /status JSON: the status page's rows as a table, a status report and `explain`. Pure."""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import datetime
from typing import Any, TextIO

from agent.text import printable

GREEN, RED, YELLOW, BLUE, DIM, BOLD, RESET = (
    "\033[32m", "\033[31m", "\033[33m", "\033[34m", "\033[2m", "\033[1m", "\033[0m")
STATE_COLOR = {"up": GREEN, "down": RED, "drain": YELLOW, "maint": BLUE}
HEADER = ("CHECK", "TYPE", "CRIT", "STATUS", "VALUE", "THRESHOLD", "LATENCY", "OK/FAIL", "CHANGED", "HISTORY",
          "REASON")
STATUS_COLUMN, HISTORY_COLUMN, REASON_COLUMN = 3, 9, 10  # in HEADER; table() finds them by name


def use_color(choice: str, stream: TextIO) -> bool:
    """--color always/never, or auto: a terminal, and NO_COLOR unset or empty (no-color.org)."""
    if choice != "auto":
        return choice == "always"
    return stream.isatty() and not os.environ.get("NO_COLOR")


def paint(text: str, code: str, color: bool) -> str:
    return f"{code}{text}{RESET}" if color and text else text


def clean(obj: Any) -> Any:
    """The agent's JSON with every string escaped (agent.text.printable): what a dependency or another
    agent wrote cannot move the cursor, retitle the terminal or clear the screen, whatever --color says."""
    if isinstance(obj, str):
        return printable(obj)
    if isinstance(obj, dict):
        return {clean(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [clean(v) for v in obj]
    return obj


# -- values --------------------------------------------------------------------------------------


def parse_time(iso: str | None) -> datetime | None:
    if not iso:
        return None
    return datetime.fromisoformat(iso.replace("Z", "+00:00"))


def duration(seconds: float) -> str:
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60}m"
    return f"{s // 86400}d {s % 86400 // 3600}h"


def ago(iso: str | None, now: datetime | None) -> str:
    t = parse_time(iso)
    if t is None or now is None:
        return "—"
    return duration((now - t).total_seconds()) + " ago"


def clock(iso: str | None, now: datetime | None) -> str:
    """HH:MM:SS in UTC, with the date when it is not today."""
    t = parse_time(iso)
    if t is None:
        return "—"
    return t.strftime("%H:%M:%S" if now is not None and t.date() == now.date() else "%Y-%m-%d %H:%M:%S")


def seconds(s: float | None) -> str:
    """A latency in the unit it reads best in, three significant digits: 420 µs, 1 ms (not 1000 µs), 1.5 s."""
    if s is None:
        return "—"
    if s <= 0:  # a millisecond clock (uvloop's loop.time) reads a sub-millisecond sample as 0
        return "<1 ms"
    for scale, unit in ((1.0, "s"), (1e-3, "ms"), (1e-6, "µs")):
        if s >= scale * 0.9995 or unit == "µs":  # 0.9996 ms rounds to 1 ms, so it is written in ms
            n = s / scale
            return f"{n:.3g} {unit}" if n < 1000 else f"{n:.0f} {unit}"
    raise AssertionError("unreachable")


def size(b: float) -> str:
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    i = 0
    while b >= 1024 and i < len(units) - 1:
        b /= 1024
        i += 1
    return f"{b:.{1 if i else 0}f} {units[i]}"


def value(c: dict[str, Any]) -> str:
    """The observed value as the status page shows it."""
    v, unit = c.get("observedValue"), c.get("observedUnit", "")
    if v is None:
        return c.get("detail") or "—"
    if unit == "percent":
        return c.get("detail") or f"{v:.1f}%"
    if unit == "seconds":
        return seconds(v)
    if unit == "bytes":
        return size(v)
    return f"{v:g} {unit}".strip()


def pill(c: dict[str, Any]) -> str:
    if c.get("state") == "stale":
        return "STALE"
    if c.get("state") == "unknown":
        return "UNKNOWN"
    return "UP" if c.get("status") == "pass" else "DOWN"


def now_of(status: dict[str, Any]) -> datetime | None:
    return parse_time((status.get("healthgate") or {}).get("time"))


def checks(status: dict[str, Any]) -> list[dict[str, Any]]:
    return [entries[0] for entries in (status.get("checks") or {}).values() if entries]


# -- the table -----------------------------------------------------------------------------------


def check_rows(status: dict[str, Any], history: int = 20) -> list[tuple[str, ...]]:
    """One row per check, with the status page's columns; `history` = how many recent results to show."""
    status = clean(status)
    now = now_of(status)
    rows: list[tuple[str, ...]] = [HEADER]
    for c in checks(status):
        h = c.get("history", "")
        rows.append((
            c.get("componentId", "?"), c.get("componentType", ""), "yes" if c.get("critical") else "no", pill(c),
            value(c), c.get("threshold", ""), seconds(c.get("durationSeconds")),
            f"{c.get('consecutiveSuccesses', 0)}/{c.get('consecutiveFailures', 0)}",
            ago(c.get("lastTransition"), now) if c.get("lastTransition") else "—",
            h[-history:] if history else "",
            c.get("output", "") if c.get("status") != "pass" else "",
        ))
    return rows


ELLIPSIS = "…"
# How a table wider than the terminal gives way, step by step until it fits: a long value is cut, then the
# columns a glance can spare go, then the threshold and value are cut further, and they go before the reason
# of a failing check does; last, the reason is cut to the room left (at least 20 characters). --wide shows all.
NARROWING = (("clip", "VALUE", 20), ("drop", "HISTORY", 0), ("drop", "CHANGED", 0), ("drop", "OK/FAIL", 0),
             ("drop", "CRIT", 0), ("drop", "TYPE", 0), ("clip", "THRESHOLD", 14), ("clip", "VALUE", 12),
             ("drop", "LATENCY", 0), ("drop", "THRESHOLD", 0), ("clip", "REASON", 20))


def clip(text: str, width: int) -> str:
    """`text` cut to `width` characters, with an ellipsis when something was cut."""
    return text if len(text) <= width else text[: max(0, width - 1)] + ELLIPSIS


def _width(rows: Sequence[Sequence[str]]) -> int:
    return sum(max(len(r[i]) for r in rows) for i in range(len(rows[0]))) + 2 * (len(rows[0]) - 1)


def fit(rows: Sequence[Sequence[str]], width: int | None) -> list[tuple[str, ...]]:
    """The table narrowed to `width` columns (NARROWING) where it can be; None = every column in full."""
    out = [tuple(r) for r in rows]
    if width is None or not out:
        return out
    for step, name, floor in NARROWING:
        over = _width(out) - width
        if over <= 0:
            break
        if name not in out[0]:
            continue
        i = out[0].index(name)
        if step == "drop":
            out = [r[:i] + r[i + 1:] for r in out]
            continue
        room = max(floor, len(name), max(len(r[i]) for r in out) - over)
        out = [out[0], *(r[:i] + (clip(r[i], room),) + r[i + 1:] for r in out[1:])]
    return out


def table(rows: Sequence[Sequence[str]], color: bool, width: int | None = None) -> str:
    """Aligned columns within `width` (None: every column in full); the last column is not padded. Colour
    marks status, history and reasons."""
    rows = fit(rows, width)
    header = rows[0]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    lines = []
    for n, row in enumerate(rows):
        cells = [cell.ljust(w) for cell, w in zip(row, widths, strict=False)] + [row[-1]]
        if n == 0:
            cells = [paint(c, BOLD, color) for c in cells]
        elif color:  # by the header's names: a narrowed table may have dropped columns
            if "STATUS" in header:
                at = header.index("STATUS")
                code = GREEN if row[at] == "UP" else RED if row[at] == "DOWN" else YELLOW
                cells[at] = paint(cells[at], code, color)
            if "HISTORY" in header:
                at = header.index("HISTORY")
                pad = cells[at][len(row[at]):]
                cells[at] = "".join(paint(ch, GREEN if ch == "+" else RED, color) for ch in row[at]) + pad
            if header[-1] == "REASON":
                cells[-1] = paint(cells[-1], RED, color)
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


# -- status --------------------------------------------------------------------------------------


def headline(status: dict[str, Any], color: bool) -> str:
    """`DOWN  host  since ... (for ...)` and the reason, as the status page's banner says it."""
    hg = status["healthgate"]
    now = now_of(status)
    state = hg.get("state") or hg.get("verdict", "down")
    word = paint(state.upper(), BOLD + STATE_COLOR.get(state, RED), color)
    since = hg.get("since")
    when = f"since {clock(since, now)} UTC (for {ago(since, now).removesuffix(' ago')})" if since else ""
    reason = "all critical checks pass" if state == "up" else status.get("output", "")
    if state in ("drain", "maint") and hg.get("adminUntil"):
        reason += f" (until {clock(hg['adminUntil'], now)} UTC)"
    return f"{word}  {status.get('serviceId', '')}  {when}".rstrip() + f"\n{reason}"


def journal_lines(journal: dict[str, Any], now: datetime | None, limit: int, color: bool,
                  width: int | None = None) -> list[str]:
    entries = list(journal.get("entries") or [])[-limit:][::-1] if limit else []
    rows = [(clock(e.get("time"), now), e.get("kind", ""), e.get("name", ""), e.get("from", ""), e.get("to", ""),
             e.get("reason", "")) for e in entries]
    if not rows:
        return ["(no transitions yet)"]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    out = []
    for r in rows:
        to_width = max(len(x[4]) for x in rows)
        to = paint(r[4].ljust(to_width), STATE_COLOR.get(r[4], ""), color)
        room = None if width is None else max(24, width - sum(widths) - len("->") - to_width - 2 * 6)
        reason = r[5] if room is None else clip(r[5], room)
        out.append("  ".join([*(c.ljust(w) for c, w in zip(r[:4], widths, strict=False)), "->", to, reason]).rstrip())
    return out


def status_report(status: dict[str, Any], journal: dict[str, Any], color: bool, transitions: int = 10,
                  width: int | None = None) -> str:
    """`width`: the terminal's columns the tables are cut to (long reasons end in an ellipsis); None = full."""
    status, journal = clean(status), clean(journal)
    now = now_of(status)
    parts = [headline(status, color), "", table(check_rows(status), color, width)]
    if status.get("groups"):
        parts += ["", paint("GROUPS", BOLD, color), group_table(group_rows(status), color, width or WIDTH)]
    if transitions:
        parts += ["", paint("RECENT TRANSITIONS (UTC, newest first)", BOLD, color),
                  *journal_lines(journal, now, transitions, color, width)]
    return "\n".join(parts)


def exit_code(status: dict[str, Any]) -> int:
    """0 when the node is served up; 2 when down, draining or in maintenance."""
    return 0 if (status.get("healthgate") or {}).get("state", "down") == "up" else 2


# -- explain -------------------------------------------------------------------------------------


def _n(count: int, word: str) -> str:
    return f"{count} {word}" + ("" if count == 1 else "s")


def _every(c: dict[str, Any]) -> str:
    interval = c.get("intervalSeconds")
    return f" (sampled every {interval:g}s)" if interval else ""


def _failing_part(c: dict[str, Any], now: datetime | None) -> str:
    name = f"{c.get('componentId')} ({c.get('componentType')})"
    why = c.get("output") or c.get("lastTransitionReason") or "failing"
    ok, fail, rise = c.get("consecutiveSuccesses", 0), c.get("consecutiveFailures", 0), c.get("rise", 1)
    if c.get("state") == "stale":
        return f"{name} has no fresh result: its probe or scheduler is stuck"
    if ok:
        return (f"{name} is recovering: it passed {ok} of the {rise} samples in a row it needs"
                f" (it had failed with: {c.get('lastTransitionReason') or why})")
    if c.get("state") == "unknown" and not c.get("time"):
        return f"{name} has no result yet"
    since = f", down for {ago(c['lastTransition'], now).removesuffix(' ago')}" if c.get("lastTransition") else ""
    return f"{name}: {why} ({_n(fail, 'failure')} in a row{since}; it needs {rise} passes in a row to rise)"


def _down_because(failing: list[dict[str, Any]], word: str, now: datetime | None) -> str:
    """"1 critical check fails: ... It comes back UP after ...": the failing checks and what brings it back."""
    parts = "; ".join(_failing_part(c, now) for c in failing)
    text = f"{_n(len(failing), word)} {'fails' if len(failing) == 1 else 'fail'}: {parts}."
    if len(failing) == 1:
        c = failing[0]
        left = max(0, c.get("rise", 1) - c.get("consecutiveSuccesses", 0))
        return text + (f" It comes back UP after {_n(left, 'more passing sample')} in a row of "
                       f"{c.get('componentId')}{_every(c)}.")
    return text + " It comes back UP once every one of them passes its rise count in a row."


def _next_risk(crit: list[dict[str, Any]], now: datetime | None, subject: str = "the node") -> str:
    """What would take the node (or `subject`) down next: a check already failing, else the least headroom,
    else the flakiest."""
    if not crit:
        return ("It has no critical checks, so only drain, maintenance or the agent's own health can take it "
                "down.")
    wobbling = [c for c in crit if c.get("consecutiveFailures", 0) > 0]
    if wobbling:
        c = max(wobbling, key=lambda c: c["consecutiveFailures"] / max(1, c.get("fall", 1)))
        fail, fall = c["consecutiveFailures"], c.get("fall", 1)
        return (f"Closest to taking it down: {c.get('componentId')} ({c.get('componentType')}) has failed "
                f"{fail} of the {fall} samples in a row that would take it down: {c.get('output') or 'failing'}.")
    shakiest = min(crit, key=lambda c: (-c.get("history", "").count("-"), c.get("consecutiveSuccesses", 0)))
    h = shakiest.get("history", "")
    failed = h.count("-")
    flaky = (f"{shakiest.get('componentId')} ({shakiest.get('componentType')}): {failed} of its last {len(h)} "
             f"samples failed, the last change {ago(shakiest.get('lastTransition'), now)} "
             f"({shakiest.get('lastTransitionReason') or 'no reason'})")
    measured = [c for c in crit if isinstance(c.get("headroom"), int | float)]
    if measured:
        c = min(measured, key=lambda c: c["headroom"])
        text = (f"Closest to its threshold: {c.get('componentId')} ({c.get('componentType')}) at {value(c)} "
                f"against {c.get('threshold') or 'its threshold'}, {max(0.0, c['headroom']) * 100:.0f}% headroom "
                f"left; {_n(c.get('fall', 1), 'failing sample')} in a row would take {subject} down.")
        if failed and shakiest is not c:
            text += f" Recently unsteady: {flaky}."
        return text
    if failed:
        return (f"No critical check reports how close it is to a threshold; the shakiest is {flaky}; "
                f"{_n(shakiest.get('fall', 1), 'failure')} in a row would take {subject} down.")
    return (f"No critical check reports how close it is to a threshold, and none failed in its last samples; "
            f"the one with the fewest passes in a row is {shakiest.get('componentId')} "
            f"({shakiest.get('componentType')}, {shakiest.get('consecutiveSuccesses', 0)}).")


def explain(status: dict[str, Any]) -> str:
    """One paragraph: why the node is down now, or what would take it down next; then its verdict groups."""
    status = clean(status)
    return _explain_node(status) + groups_sentence(status)


def _explain_node(status: dict[str, Any]) -> str:
    hg = status["healthgate"]
    now = now_of(status)
    host = status.get("serviceId") or "this node"
    state = hg.get("state") or hg.get("verdict", "down")
    since = f" since {clock(hg['since'], now)} UTC ({ago(hg['since'], now)})" if hg.get("since") else ""
    all_checks = checks(status)
    crit = [c for c in all_checks if c.get("critical")]
    minor = [c.get("componentId", "?") for c in all_checks if not c.get("critical") and c.get("status") != "pass"]
    aside = (f" Not critical, so not counted: {', '.join(minor)} {'is' if len(minor) == 1 else 'are'} failing."
             if minor else "")

    if state == "down":
        failing = [c for c in crit if c.get("status") != "pass"]
        if not failing:
            return (f"{host} is DOWN{since}: {status.get('output') or 'the agent cannot vouch for it'}. No critical "
                    f"check is failing: the agent itself cannot vouch for the node (it is starting, stopping or "
                    f"its event loop is stalled), and fails closed.{aside}")
        text = f"{host} is DOWN{since} because {_down_because(failing, 'critical check', now)}"
        if hg.get("admin") not in (None, "ready"):
            text += f" It is also set to {hg['admin'].upper()}" + (f" ({hg['adminReason']})" if hg.get("adminReason") else "") + "."
        return text + aside

    if state in ("drain", "maint"):
        why = f" ({hg['adminReason']})" if hg.get("adminReason") else ""
        until = f" until {clock(hg['adminUntil'], now)} UTC" if hg.get("adminUntil") else ""
        return (f"{host} is out of the pool by an operator: {state.upper()}{why}{since}{until}. Its critical checks "
                f"pass; it serves UP again once set back to ready. {_next_risk(crit, now)}{aside}")

    guard = status.get("guard") or {}
    if guard.get("state") in ("held", "store_unavailable") and guard.get("serving") and guard.get("reasons"):
        return (f"{host} is UP, {guard.get('words')}{since}. The failing checks are shared by the fleet, which "
                f"cannot spare this node now; a local fault would still take it down at once.{aside}")
    verb = "passes" if len(crit) == 1 else "pass"
    return f"{host} is UP{since}: {_n(len(crit), 'critical check')} {verb}. {_next_risk(crit, now)}{aside}"


def unreachable(url: str, error: str) -> str:
    url, error = printable(url), printable(error)
    return (f"UNREACHABLE  {url}\nagent unreachable ({error}): the node's state is unknown from here; a load "
            f"balancer that cannot reach the agent either counts the node as down.")


# -- verdict groups ------------------------------------------------------------------------------

GROUP_HEADER = ("GROUP", "VERDICT", "ADMIN", "CHECKS", "REASON")
WIDTH = 99  # a group table line, at most: it fits a 100-column terminal
GROUP_CAPS = (16, 7, 31, 20)  # the widest the columns before REASON may grow; longer cells are cut with "…"


def cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(0, width - 1)] + "…"


def group_verdict(g: dict[str, Any]) -> str:
    """UP or DOWN: what the group's checks and the agent say, drain and maintenance aside (the ADMIN column)."""
    return "DOWN" if g.get("state", "down") == "down" else "UP"


def group_admin(g: dict[str, Any], now: datetime | None) -> str:
    """The group's own admin state (`drain --group`): `ready`, `maint` or `drain until 12:30:00`."""
    admin = g.get("admin") or "ready"
    if admin == "ready" or not g.get("adminUntil"):
        return admin
    return f"{admin} until {clock(g['adminUntil'], now)}"


def group_reason(g: dict[str, Any]) -> str:
    """Why the group is not served UP: its failing checks or the agent's own condition, else its own
    drain's or maintenance's reason, else the node's drain or maintenance; for an UP group held by its
    fleet guard, the guard's words."""
    state = g.get("state", "down")
    if state == "down":
        return g.get("output") or "down"
    if (g.get("admin") or "ready") != "ready":
        return g.get("adminReason") or ""
    return f"node {g.get('output') or state}" if state != "up" else g.get("output") or ""


def group_rows(status: dict[str, Any]) -> list[tuple[str, ...]]:
    """One row per verdict group: its verdict, its own admin state, its checks, why it is not served UP."""
    status = clean(status)
    now = now_of(status)
    return [GROUP_HEADER, *((name, group_verdict(g), group_admin(g, now), ", ".join(g.get("checks") or ()),
                             group_reason(g)) for name, g in (status.get("groups") or {}).items())]


def group_table(rows: Sequence[Sequence[str]], color: bool, width: int = WIDTH) -> str:
    """Aligned columns within `width`: the capped columns first, the reason cut to what is left."""
    rows = [[cut(cell, cap) for cell, cap in zip(r, GROUP_CAPS, strict=False)] + [r[-1]] for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(GROUP_CAPS))]
    room = width - sum(widths) - 2 * len(widths)
    lines = []
    for n, row in enumerate(rows):
        cells = [cell.ljust(w) for cell, w in zip(row, widths, strict=False)] + [cut(row[-1], max(room, 1))]
        if n == 0:
            cells = [paint(c, BOLD, color) for c in cells]
        elif color:
            cells[1] = paint(cells[1], GREEN if row[1] == "UP" else RED, color)
            cells[-1] = paint(cells[-1], RED, color)
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _group_state_words(name: str, g: dict[str, Any], now: datetime | None) -> str:
    """`api is DOWN because db fails: ...`, `static is UP, drained (reindex) until 12:30:00 UTC`."""
    failing = list(g.get("failing") or ())
    if g.get("state", "down") == "down":
        if failing:
            text = f"{name} is DOWN because {', '.join(failing)} {'fails' if len(failing) == 1 else 'fail'}"
        else:
            text = f"{name} is DOWN"
        text += f" ({g['output']})" if g.get("output") else ""
    else:
        text = f"{name} is UP"
    admin = g.get("admin") or "ready"
    if admin != "ready":
        text += f", {'drained' if admin == 'drain' else 'in maintenance'} alone"
        text += f" ({g['adminReason']})" if g.get("adminReason") else ""
        text += f" until {clock(g['adminUntil'], now)} UTC" if g.get("adminUntil") else ""
    return text


def groups_sentence(status: dict[str, Any]) -> str:
    """` Its verdict groups: api is DOWN because db fails (...); static is UP.`, or "" without groups."""
    groups = status.get("groups") or {}
    if not groups:
        return ""
    now = now_of(status)
    return " Its verdict groups: " + "; ".join(_group_state_words(n, g, now) for n, g in groups.items()) + "."


def unknown_group(status: dict[str, Any], name: str) -> str:
    """The error for `--group NAME` when the agent has no such group."""
    known = ", ".join(clean(list(status.get("groups") or {}))) or "none"
    return f"healthgate: --group: the agent has no group named {printable(name)!r} (known: {known})"


def _members(status: dict[str, Any], g: dict[str, Any]) -> list[dict[str, Any]]:
    names = set(g.get("checks") or ())
    return [c for c in checks(status) if c.get("componentId") in names]


def group_report(status: dict[str, Any], journal: dict[str, Any], name: str, color: bool,
                 transitions: int = 10) -> str:
    """`healthgate status --group NAME`: the group's verdict and admin state, its checks, its transitions."""
    status, journal = clean(status), clean(journal)
    now = now_of(status)
    g = status["groups"][name]
    state = g.get("state", "down")
    word = paint(state.upper(), BOLD + STATE_COLOR.get(state, RED), color)
    lines = [f"{word}  group {name} on {status.get('serviceId', '')}".rstrip(),
             "all its checks pass" if state == "up" else g.get("output") or state,
             cut(f"verdict {group_verdict(g)}, admin {group_admin(g, now)}; checks: {', '.join(g.get('checks') or ())}",
                 WIDTH)]
    members = set(g.get("checks") or ())
    rows = check_rows(status)
    parts = ["\n".join(lines), "", table([rows[0], *(r for r in rows[1:] if r[0] in members)], color)]
    if transitions:
        mine = [e for e in journal.get("entries") or ()
                if (e.get("kind") == "group" and e.get("name") == name) or e.get("name") == f"group:{name}"
                or (e.get("kind") == "check" and e.get("name") in members)]
        parts += ["", paint("RECENT TRANSITIONS (UTC, newest first)", BOLD, color),
                  *journal_lines({"entries": mine}, now, transitions, color)]
    return "\n".join(parts)


def group_exit_code(status: dict[str, Any], name: str) -> int:
    """As exit_code(), for one group: 0 when it is served up; 2 when down, draining or in maintenance."""
    return 0 if (status.get("groups") or {}).get(name, {}).get("state", "down") == "up" else 2


def explain_group(status: dict[str, Any], name: str) -> str:
    """`healthgate explain --group NAME`: why the group is down now, or what would take it down next."""
    status = clean(status)
    now = now_of(status)
    g = status["groups"][name]
    label = f"Group {name} on {status.get('serviceId') or 'this node'}"
    members = _members(status, g)
    state = g.get("state", "down")
    admin = g.get("admin") or "ready"
    own = (f" It is also set to {admin.upper()} alone" + (f" ({g['adminReason']})" if g.get("adminReason") else "")
           + (f" until {clock(g['adminUntil'], now)} UTC" if g.get("adminUntil") else "") + ".") if admin != "ready" else ""
    if state == "down":
        failing = [c for c in members if c.get("componentId") in set(g.get("failing") or ())]
        if not failing:
            return (f"{label} is DOWN: {g.get('output') or 'the agent cannot vouch for it'}. None of its checks "
                    f"is failing: the agent itself cannot vouch for the node (it is starting, stopping or its event "
                    f"loop is stalled), and fails closed.{own}")
        return f"{label} is DOWN because {_down_because(failing, 'check', now)}{own}"
    risk = _next_risk(members, now, "the group")
    if state in ("drain", "maint"):
        if admin != "ready":
            why = f" ({g['adminReason']})" if g.get("adminReason") else ""
            until = f" until {clock(g['adminUntil'], now)} UTC" if g.get("adminUntil") else ""
            return (f"{label} is out of its backends by an operator: {admin.upper()}{why}{until}, the group alone. "
                    f"Its checks pass; it serves UP again once set back to ready (`healthgate ready --group "
                    f"{name}`). {risk}")
        return (f"{label} is {state.upper()} with the whole node ({g.get('output') or state}). Its checks pass; it "
                f"serves UP again once the node is set back to ready. {risk}")
    if g.get("output"):  # held by the group's own fleet guard
        return (f"{label} is UP, {g['output']}. The failing checks are shared by the fleet, which cannot spare "
                f"this node in the group now; a local fault would still take the group down at once.")
    verb = "passes" if len(members) == 1 else "pass"
    return f"{label} is UP: {_n(len(members), 'check')} {verb}. {risk}"

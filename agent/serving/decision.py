"""The serving decision: what every consumer says, from the snapshot, the agent's own condition and the time."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from agent.model import Admin, CheckView, Snapshot
from agent.verdict import aggregate, passing, stale, why

if TYPE_CHECKING:
    from agent.fleet.guard import GuardView

# Every consumer (the fast /health responder, the aiohttp handlers, /status and its page, /metrics, the
# agent-check reply, systemd's WATCHDOG=1 and STATUS=) asks decide() and says what it returns. None of
# them looks at the snapshot's verdict, its age or the heartbeat on its own: this module is the one place
# where "fresh", "live", "up" and the reasons are decided, and the reason strings below live only here.

STALLED = "agent stalled: no fresh verdict"
STOPPING = "shutting down"

BEAT = 0.1  # seconds between heartbeats, at most; see beat()


def beat(max_loop_lag: float) -> float:
    """The heartbeat period for a lag limit: short enough that an idle agent's heartbeat is never too old.

    A consumer is told DOWN when the heartbeat is older than `max_loop_lag`, so the heartbeat must come
    several times within it, or a healthy idle agent would look stalled between two beats.
    """
    return min(BEAT, max_loop_lag / 4)


@dataclass(frozen=True, slots=True)
class Condition:
    """The agent's own condition, replaced whole by the heartbeat and the lifecycle; read with a snapshot."""

    heartbeat: float  # monotonic time of the last heartbeat, the one that measured the loop's lag
    loop_ok_at: float  # the loop must stay healthy until then before the node can be up again
    loop_reason: str  # why the loop was last found unhealthy
    stopping: bool
    max_age: float  # policy.max_loop_lag: how old the snapshot and the heartbeat may be
    drain_status: int  # server.drain_status: /health's code while a healthy node is drained
    guard: GuardView | None = None  # the fleet guard's view; None without [fleet]
    # Each verdict group's own fleet guard view (its budget is its own: agent.fleet.config.scope_group);
    # empty without [fleet]. Replaced whole, never mutated.
    group_guards: Mapping[str, GuardView] = field(default_factory=dict, hash=False)


@dataclass(frozen=True, slots=True)
class Answer:
    """What every consumer says about the node at one moment."""

    fresh: bool  # the snapshot and the heartbeat are both recent: the agent can vouch for what it says
    live: bool  # /live: fresh, and the loop has been healthy for loop_recovery
    healthy: bool  # every critical check passes and the agent itself is fine; drain/maint not considered
    up: bool  # served UP: healthy and admin ready (/health 200, healthgate_up 1, status pass)
    code: int  # /health's status: 200, 503, or drain_status for a healthy node being drained
    state: str  # for people: up, down, drain or maint (failing checks outrank drain/maint)
    reason: str  # why not up, "" when up: the agent's own condition, then the checks, then the admin state
    down_reason: str  # why not healthy, "" when healthy
    agent_reason: str  # the agent's own condition when it cannot vouch (stalled, stopping, loop lag), else ""
    admin: Admin
    admin_reason: str
    failing: tuple[str, ...]  # critical checks holding the node down (empty when down for the agent's reasons)
    held: bool = False  # UP only because the fleet guard holds it: its checks fail for shared reasons
    note: str = ""  # the fleet guard's words while it holds the node, for people


def agent_reason(snap: Snapshot, cond: Condition, now: float) -> str:
    """Why the agent itself cannot vouch for the node right now, or ""."""
    if now - snap.computed_at > cond.max_age or now - cond.heartbeat > cond.max_age:
        return STALLED
    if cond.stopping:
        return STOPPING
    if now < cond.loop_ok_at:
        return cond.loop_reason or STALLED
    return ""


def admin_text(admin: Admin, reason: str) -> str:
    return f"{admin.value}: {reason}" if reason else admin.value


def decide(snap: Snapshot, cond: Condition, now: float, group: str | None = None) -> Answer:
    """The one serving decision, for the node or for one verdict group (KeyError for an unknown group).

    A group's answer is the node's with the group's checks in place of the critical ones: the agent's own
    condition (a stall, shutdown) and a node-wide drain or maintenance apply to every group; a group's
    own drain or maintenance only to it. O(1) unless a check went stale since the snapshot was taken.
    """
    own = agent_reason(snap, cond, now)
    fresh = own != STALLED
    admin, admin_reason = snap.admin, snap.admin_reason
    if group is None:
        verdict, members = snap.verdict, None
    else:
        g = snap.groups[group]
        verdict, members = g.verdict, g.members
        if admin is Admin.READY:
            admin, admin_reason = g.admin, g.admin_reason
    if verdict.up and now > verdict.until:  # a check went stale after the snapshot: decide again, at `now`
        verdict = aggregate(snap.checks, now, members=members)
    # The fleet guard may turn "DOWN for shared reasons only" into held (UP), never anything else. A group
    # asks its own guard, whose budget is counted per (fleet group, verdict group), never the node's.
    guard = cond.guard if group is None else cond.group_guards.get(group)
    held = not own and not verdict.up and verdict.shared_only and guard is not None and guard.serve
    healthy = not own and (verdict.up or held)
    down = own or ("" if verdict.up or held else verdict.reason)
    up = healthy and admin is Admin.READY
    if up:
        code = 200
    elif healthy and admin is Admin.DRAIN:
        code = cond.drain_status
    else:
        code = 503
    if not healthy:
        state, reason = "down", down
    elif admin is Admin.READY:
        state, reason = "up", ""
    else:
        state, reason = admin.value, admin_text(admin, admin_reason)
    return Answer(
        fresh=fresh, live=fresh and now >= cond.loop_ok_at, healthy=healthy, up=up,
        code=code, state=state, reason=reason, down_reason=down, agent_reason=own, admin=admin,
        admin_reason=admin_reason, failing=() if own else verdict.failing, held=held,
        note=guard.words() if held and guard is not None else "",
    )


def health_response(answer: Answer) -> tuple[int, str]:
    """/health and /ready: the status code and the one-word body."""
    return answer.code, "up\n" if answer.code == 200 else "down\n"


def live_response(answer: Answer) -> tuple[int, str]:
    """/live: 200 while the agent's own loop is healthy; the checks do not matter."""
    return (200, "live\n") if answer.live else (503, "stalled\n")


def unknown_group(name: str) -> Answer:
    """The answer for a verdict group the config does not have (a typo in agent-send): DOWN, saying so."""
    reason = f"unknown group {name!r}"
    return Answer(fresh=True, live=True, healthy=False, up=False, code=503, state="down", reason=reason,
                  down_reason=reason, agent_reason="", admin=Admin.READY, admin_reason="", failing=())


def excluding(snap: Snapshot, excluded: frozenset[str], now: float, group: str | None = None) -> Snapshot:
    """The snapshot as if the excluded checks passed (kube-apiserver's ?exclude=), for the node or a group."""
    if not excluded:
        return snap
    if group is None:
        return replace(snap, verdict=aggregate(snap.checks, now, excluded=excluded))
    g = snap.groups[group]
    verdict = aggregate(snap.checks, now, excluded=excluded, members=g.members)
    return replace(snap, groups={**snap.groups, group: replace(g, verdict=verdict)})


def check_up(fresh: bool, v: CheckView, now: float) -> bool:
    """One check as /health/<check>, /status and healthgate_check_up see it: passing, and its result fresh,
    from an agent that can vouch for it (`fresh` is Answer.fresh)."""
    return fresh and passing(v, now)


def check_reason(fresh: bool, v: CheckView, now: float) -> str:
    """Why one check does not count as passing right now."""
    if not fresh:
        return STALLED
    return why(v, now)


def check_state(v: CheckView, now: float) -> str:
    """unknown, up, down or stale: one check's state for people."""
    return "stale" if stale(v, now) else v.state.status.value


def describe(answer: Answer) -> str:
    """One line for `systemctl status` and logs; a newline would start another sd_notify field."""
    if answer.up:
        text = f"up, {answer.note}" if answer.held else "up"
    elif answer.healthy:
        text = answer.reason
    else:
        text = f"down: {answer.reason}"
    return " ".join(text.split())


def agent_check_words(answer: Answer) -> tuple[str, str]:
    """HAProxy's health word and admin word for this answer."""
    return ("up" if answer.healthy else "down"), answer.admin.value


def agent_check_reason(answer: Answer) -> str:
    """The description after '#': the admin reason, then why down."""
    parts = []
    if answer.admin is not Admin.READY:
        parts.append(answer.admin_reason or answer.admin.value)
    if not answer.healthy:
        parts.append(answer.down_reason or "down")
    elif answer.held:
        parts.append(answer.note)
    return "; ".join(parts)


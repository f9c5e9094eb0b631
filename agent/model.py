"""Immutable values that flow from probes to the serving paths."""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, field


class Status(enum.StrEnum):
    UNKNOWN = "unknown"  # no verdict yet: counts as failing (start down)
    UP = "up"
    DOWN = "down"


class Admin(enum.StrEnum):
    READY = "ready"
    DRAIN = "drain"
    MAINT = "maint"


@dataclass(frozen=True, slots=True)
class Observation:
    """What a probe saw when it passed. `value` is the headline number shown in /status and metrics.

    `headroom` says how far the value is from its threshold, when the probe has one (see
    agent.probes.base.headroom): 1 = ideal, 0 = at the threshold, below 0 = past it. `healthgate explain`
    names the check with the least headroom as the one closest to taking the node down.
    """

    value: float | None = None
    unit: str = ""
    detail: str = ""
    values: tuple[tuple[str, float, str], ...] = ()  # extra (name, value, unit) series
    headroom: float | None = None


@dataclass(frozen=True, slots=True)
class Result:
    """One sample of one check, as the runner saw it."""

    ok: bool
    reason: str  # "" when ok; a human-actionable sentence otherwise
    kind: str  # bounded metric label: "ok", "timeout", "error", "invalid" or the probe's own failure kind
    duration: float  # seconds, monotonic
    started: float  # loop.time() when the sample started
    finished: float  # loop.time() when the sample ended
    wall: float  # time.time() at the end, for display only
    observation: Observation | None = None


@dataclass(frozen=True, slots=True)
class CheckState:
    """Where one check stands after the results seen so far."""

    status: Status = Status.UNKNOWN
    consecutive_ok: int = 0
    consecutive_fail: int = 0
    last: Result | None = None
    changed_at: float | None = None  # monotonic time of the last status change
    changed_wall: float | None = None  # wall time of the same, for display
    change_reason: str = ""
    history: tuple[bool, ...] = ()  # most recent last, capped
    flaps: tuple[float, ...] = ()  # monotonic times of the newest failures after a pass (flap damping)
    required_rise: int | None = None  # rise in force (raised by flap damping); None = the configured one
    ever_up: bool = False  # has been UP under this config: only then may the fleet guard hold it up


@dataclass(frozen=True, slots=True)
class CheckView:
    """A check as the serving paths see it: its state plus whether it counts right now."""

    name: str
    type: str
    critical: bool
    state: CheckState
    threshold: str = ""
    rise: int = 1  # configured; flap damping may demand more (CheckState.required_rise)
    fall: int = 1
    interval: float = 0.0
    fresh_until: float = math.inf  # monotonic: past this the last result is stale (see agent.verdict.stale)
    shared: bool = False  # a fault every node may share (the fleet guard's scope "shared")


@dataclass(frozen=True, slots=True)
class Verdict:
    up: bool
    reason: str  # why down ("" when up)
    failing: tuple[str, ...] = ()  # names of critical checks holding the node down
    until: float = math.inf  # monotonic: an UP verdict holds until then without a new result
    shared_only: bool = False  # DOWN, and every failing check is a shared fault the fleet guard may hold


@dataclass(frozen=True, slots=True)
class Group:
    """One verdict group as the serving paths see it: its checks' verdict and its own admin state."""

    verdict: Verdict
    members: frozenset[str]
    admin: Admin = Admin.READY  # the group's own drain/maint; the node's, when not ready, overrides it
    admin_reason: str = ""


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything a request needs, swapped atomically; agent.serving.decision.decide() turns it into an answer."""

    verdict: Verdict
    admin: Admin
    admin_reason: str
    checks: tuple[CheckView, ...]
    computed_at: float  # monotonic
    since: float  # monotonic time the served up/down last changed
    since_wall: float
    loop_lag: float  # at the last heartbeat, for display; agent.serving.decision decides what it means
    groups: Mapping[str, Group] = field(default_factory=dict)  # verdict groups, by name

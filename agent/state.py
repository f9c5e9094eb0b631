"""AgentState: the one mutable object. Check states, admin state, loop health and the served snapshot."""

from __future__ import annotations

import collections
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from agent import logs
from agent.config import Config
from agent.model import Admin, CheckState, CheckView, Group, Result, Snapshot, Status, Verdict
from agent.serving.decision import Answer, Condition, beat, decide
from agent.verdict import Tally, holdable, next_state, stale_limit, view

if TYPE_CHECKING:
    from agent.config import CheckConfig
    from agent.fleet.guard import FleetGuard, GuardView

# Histogram buckets for check durations, in seconds.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, float("inf"))
# Schedule lag: finer around the 100 ms that matters, so its p99 can be read off the histogram.
LAG_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5,
               float("inf"))
JOURNAL = 50


@dataclass
class CheckStats:
    """Counters for /metrics, accumulated as results arrive."""

    bounds: tuple[float, ...] = BUCKETS
    buckets: list[int] = field(default_factory=list)  # cumulative, one per bound
    duration_sum: float = 0.0
    count: int = 0
    failures: collections.Counter = field(default_factory=collections.Counter)  # kind -> n

    def __post_init__(self) -> None:
        self.buckets = self.buckets or [0] * len(self.bounds)

    def observe(self, result: Result) -> None:
        self.add(result.duration)
        if not result.ok:
            self.failures[result.kind] += 1

    def add(self, seconds: float) -> None:
        self.count += 1
        self.duration_sum += seconds
        for i, bound in enumerate(self.bounds):
            if seconds <= bound:
                self.buckets[i] += 1


class AgentState:
    """Written only by the event loop's own tasks (scheduler, heartbeat, signal and admin handlers).

    Readers (HTTP, agent-check, metrics, systemd) call `answer(now)`: agent.serving.decision.decide() over
    `snapshot` and `condition`, immutable values replaced whole, so a request never sees a half-updated
    state and never waits for a check. The snapshot is what the checks say; the condition is what the
    heartbeat and the lifecycle say about the agent itself. Only the heartbeat moves `condition.heartbeat`,
    so a refresh that runs after a stall (a result or a reload landing before the heartbeat has measured
    the lag) cannot make the agent look fresh.
    """

    def __init__(self, config: Config, now: float):
        self.config = config
        self.checks: dict[str, CheckConfig] = {c.name: c for c in config.checks}
        self.states: dict[str, CheckState] = {name: CheckState() for name in self.checks}
        self.stats: dict[str, CheckStats] = {name: CheckStats() for name in self.checks}
        self.lag_stats = CheckStats(LAG_BUCKETS)  # schedule lag of every check sample
        self.transitions: collections.Counter = collections.Counter()  # "up"/"down" -> n (served verdict)
        self.reloads: collections.Counter = collections.Counter()  # "success"/"failure" -> n
        self.last_reload_ok = True  # the config in force is the file's latest (start counts as a success)
        self.last_reload_success_wall = time.time()
        self.admin = Admin.READY
        self.admin_reason = ""
        self.admin_until: float | None = None  # wall-clock expiry; display and persistence only
        self.group_admin: dict[str, tuple[Admin, str, float | None]] = {}  # group -> admin, reason, until
        self.guard: FleetGuard | None = None  # the fleet guard, when [fleet] is set (agent.app starts it)
        self.group_guards: dict[str, FleetGuard] = {}  # each verdict group's own guard, with [fleet]
        self.stopping = False
        self.heartbeat = now
        self.loop_lag = 0.0
        self.loop_bad_until = now  # the loop must be healthy past this before the verdict can be UP
        self.loop_reason = ""
        self._ticked = False  # the first heartbeat has no previous one to measure a gap from
        self.condition = self._condition()
        self._rebuild_views()
        self.journal: collections.deque[dict] = collections.deque(maxlen=JOURNAL)
        self.started_wall = time.time()
        self.snapshot = Snapshot(
            verdict=Verdict(False, "starting"), admin=Admin.READY, admin_reason="", checks=(),
            computed_at=now, since=now, since_wall=time.time(), loop_lag=0.0,
        )
        self._answer = decide(self.snapshot, self.condition, now)
        self._settled_until = -math.inf  # refresh() sets it: until then every heartbeat refreshes
        self._group_healthy: dict[str, bool] = {}  # group -> healthy, as last journaled (absent: down)
        self.refresh(now)

    # -- readers -------------------------------------------------------------------------------

    def answer(self, now: float, group: str | None = None) -> Answer:
        """What every consumer says at `now`, of the node or of one verdict group: the one serving decision."""
        return decide(self.snapshot, self.condition, now, group)

    def _condition(self) -> Condition:
        policy = self.config.policy
        guard = getattr(self, "condition", None)
        return Condition(heartbeat=self.heartbeat, loop_ok_at=self.loop_bad_until, loop_reason=self.loop_reason,
                         stopping=self.stopping, max_age=policy.max_loop_lag,
                         drain_status=self.config.server.drain_status, guard=guard.guard if guard else None,
                         group_guards=guard.group_guards if guard else {})

    # -- writers -------------------------------------------------------------------------------

    def record(self, name: str, result: Result, now: float) -> None:
        check = self.checks.get(name)
        if check is None:  # removed by a reload while its sample was in flight
            return
        old = self.states[name]
        new = next_state(old, result, check, self.config.policy, now, result.wall)
        self.states[name] = new
        self.stats[name].observe(result)
        self._update_view(name)
        if new.status is not old.status:
            self._journal("check", name, old.status.value, new.status.value, new.change_reason,
                          critical=check.critical)
        self.refresh(now)

    def schedule_lag(self, lag: float) -> None:
        """How late a check sample started against its plan: the agent's own health under load."""
        self.lag_stats.add(lag)

    def tick(self, now: float, lag: float) -> None:
        """The heartbeat: called every beat by the scheduler with the loop lag it measured.

        A stall is measured as a consumer sees it: the time since the previous heartbeat (the rule that
        agent.serving.decision applies to every answer), not only how late this one is, so a pause a little longer
        than max_loop_lag is held down too. It is held for loop_recovery, and at least until the next
        heartbeat, so that requests answered right after it are DOWN even with loop_recovery = 0.
        """
        limit = self.config.policy.max_loop_lag
        gap = now - self.heartbeat if self._ticked else 0.0
        self._ticked = True
        self.heartbeat = now
        self.loop_lag = lag
        stall = max(lag, gap)
        if stall > limit:
            if now >= self.loop_bad_until:
                logs.event("loop_stalled", logging.WARNING, lag_seconds=round(stall, 3), limit_seconds=limit)
            self.loop_bad_until = now + max(self.config.policy.loop_recovery, beat(limit))
            self.loop_reason = f"event loop lag {stall * 1000:.0f} ms > {limit * 1000:.0f} ms"
        elif now < self._settled_until and self.guard is None:
            # Nothing the answer depends on can have changed since the last refresh (every result, admin
            # change and reload refreshes at once; the clock's effects start at _settled_until): the same
            # snapshot and answer, stamped with this beat. The heartbeat stays every beat; it costs two small
            # objects instead of a recomputed verdict and answer. (With a fleet guard every beat refreshes:
            # the guard's view moves on its own.)
            self.condition = replace(self.condition, heartbeat=now, loop_ok_at=self.loop_bad_until,
                                     loop_reason=self.loop_reason)
            old = self.snapshot
            self.snapshot = replace(old, computed_at=now, loop_lag=lag)
            return
        self.condition = self._condition()
        self.refresh(now)

    def set_admin(self, admin: Admin, reason: str = "", until: float | None = None) -> None:
        if admin is self.admin and reason == self.admin_reason and until == self.admin_until:
            return
        self._journal("admin", "node", self.admin.value, admin.value, reason)
        self.admin, self.admin_reason, self.admin_until = admin, reason, until
        # No clock is passed in: the latest time the state has seen is at most one heartbeat old.
        self.refresh(max(self.heartbeat, self.snapshot.computed_at))

    def set_group_admin(self, groups: dict[str, tuple[Admin, str, float | None]]) -> None:
        """The drain/maint of single verdict groups (`healthgate drain --group`), as the state file says."""
        groups = {g: v for g, v in groups.items() if v[0] is not Admin.READY}
        if groups == self.group_admin:
            return
        for g in sorted(set(groups) | set(self.group_admin)):
            old, new = self.group_admin.get(g, (Admin.READY, "", None)), groups.get(g, (Admin.READY, "", None))
            if old != new:
                self._journal("admin", f"group:{g}", old[0].value, new[0].value, new[1])
        self.group_admin = groups
        self.refresh(max(self.heartbeat, self.snapshot.computed_at))

    def reloaded(self, ok: bool) -> None:
        """Count a reload, whatever asked for it (SIGHUP or the config watcher)."""
        self.reloads["success" if ok else "failure"] += 1
        self.last_reload_ok = ok
        if ok:
            self.last_reload_success_wall = time.time()

    def set_stopping(self, now: float) -> None:
        self.stopping = True
        self.condition = self._condition()
        self.refresh(now)

    def changed_checks(self, config: Config) -> list[CheckConfig]:
        """The checks of `config` that are new or whose definition differs from the running one."""
        return [c for c in config.checks if self.checks.get(c.name) != c]

    def apply_config(self, config: Config, now: float, seeds: Mapping[str, Sequence[Result]] | None = None) -> set[str]:
        """Swap in a new config in one step; checks whose definition did not change keep their state.

        A new or changed check starts over from the results in `seeds` (its first samples, taken beside
        the running config), so it is served with what it has already seen, never as "no result yet". A
        changed check keeps its history strip and its flap count: a reload is no reason to forget that
        the dependency flapped. Returns the names of checks that are new or changed (their loops restart).
        """
        old_checks, old_states = self.checks, self.states
        self.config = config
        self.checks = {c.name: c for c in config.checks}
        changed = {n for n, c in self.checks.items() if old_checks.get(n) != c}
        self.states = {}
        for n, check in self.checks.items():
            if n not in changed:
                self.states[n] = old_states[n]
                continue
            before = old_states.get(n)
            st = CheckState() if before is None else CheckState(history=before.history, flaps=before.flaps)
            for result in (seeds or {}).get(n, ()):
                st = next_state(st, result, check, config.policy, result.finished, result.wall)
                self.stats.setdefault(n, CheckStats()).observe(result)
            self.states[n] = st
            was = Status.UNKNOWN if before is None else before.status
            if was is not st.status:
                self._journal("check", n, was.value, st.status.value,
                              st.change_reason or "changed by a reload", critical=check.critical)
        self.stats = {n: self.stats.get(n) or CheckStats() for n in self.checks}
        self._rebuild_views()
        logs.set_secrets(config.secrets())
        self.condition = self._condition()
        self.refresh(now)
        return changed

    # -- the snapshot --------------------------------------------------------------------------

    def _rebuild_views(self) -> None:
        """After a config change: the strings and limits of each check, computed once per config."""
        policy = self.config.policy
        self._static = {n: (c.threshold(), stale_limit(c, policy)) for n, c in self.checks.items()}
        views = [view(c, self.states[n], policy, *self._static[n]) for n, c in self.checks.items()]
        self.tally = Tally(views)
        self.groups = {g: (frozenset(cfg.checks), Tally(views, cfg.checks)) for g, cfg in self.config.groups.items()}
        self._groups_of: dict[str, list[Tally]] = {}  # check -> the tallies of the groups it is in
        for _, tally in self.groups.values():
            for name in tally.order:
                self._groups_of.setdefault(name, []).append(tally)
        self._views: tuple[CheckView, ...] | None = None

    def _update_view(self, name: str) -> None:
        v = view(self.checks[name], self.states[name], self.config.policy, *self._static[name])
        self.tally.update(v)
        for tally in self._groups_of.get(name, ()):
            tally.update(v)
        self._views = None

    def _group_snapshots(self, now: float) -> dict[str, Group]:
        out = {}
        for g, (members, tally) in self.groups.items():
            admin, reason, _ = self.group_admin.get(g, (Admin.READY, "", None))
            out[g] = Group(tally.verdict(now), members, admin, reason)
        return out

    def _observe_guards(self, verdict: Verdict, groups: Mapping[str, Group], now: float) -> None:
        """Tell the fleet guards why the node, and each verdict group, would be down, split into shared and
        local reasons, and take their views into the condition. The agent's own faults and an operator's
        drain (the node's, and a group's own for that group) are always local."""
        assert self.guard is not None
        mine = []
        if self.stopping:
            mine.append("stopping")
        if now < self.loop_bad_until or now - self.heartbeat > self.config.policy.max_loop_lag:
            mine.append("loop")
        if self.admin is not Admin.READY:
            mine.append(self.admin.value)
        node = self._observe(self.guard, None, verdict, self.tally, mine, now)
        views = {}
        for g, group in groups.items():
            guard = self.group_guards.get(g)
            if guard is not None:
                own = [group.admin.value] if group.admin is not Admin.READY else []
                views[g] = self._observe(guard, g, group.verdict, self.groups[g][1], mine + own, now)
        if node != self.condition.guard or views != self.condition.group_guards:
            self.condition = replace(self.condition, guard=node, group_guards=views)

    def _observe(self, guard: FleetGuard, group: str | None, verdict: Verdict, tally: Tally, local: list[str],
                 now: float) -> GuardView:
        """One guard (the node's, or a verdict group's) told the shared and local reasons of its verdict."""
        failing_local = [n for n in verdict.failing if not holdable(tally.views[n], now)]
        shared = [n for n in verdict.failing if n not in failing_local]
        if not verdict.up and not verdict.failing:
            failing_local.append(verdict.reason)
        guard.observe(tuple(shared), tuple(failing_local + local), now)
        view = guard.view()
        old = self.condition.guard if group is None else self.condition.group_guards.get(group)
        if (old is None and group is None) or view.state != (old.state if old else "none"):
            self._journal("guard", "node" if group is None else f"group:{group}", old.state if old else "none",
                          view.state, view.words() or "nothing shared is failing")
        return view

    def refresh(self, now: float) -> None:
        """A new snapshot; the cost is the same with 10 checks or 2,000 (see verdict.Tally)."""
        if self._views is None:  # a tuple of references, rebuilt only after a result
            self._views = tuple(self.tally.views.values())
        views = self._views
        old = self.snapshot
        verdict = self.tally.verdict(now)
        groups = self._group_snapshots(now) if self.groups else {}
        if self.guard is not None:
            self._observe_guards(verdict, groups, now)
        snap = Snapshot(
            verdict=verdict, admin=self.admin, admin_reason=self.admin_reason, checks=views,
            computed_at=now, since=old.since, since_wall=old.since_wall, loop_lag=self.loop_lag, groups=groups,
        )
        was, ans = self._answer, decide(snap, self.condition, now)
        if snap.groups or self._group_healthy:
            self._journal_groups(snap, now)
        if ans.up != was.up or ans.admin is not was.admin:
            snap = replace(snap, since=now, since_wall=time.time())
        if ans.healthy != was.healthy:
            self.transitions["up" if ans.healthy else "down"] += 1
            self._journal("verdict", "node", "up" if was.healthy else "down",
                          "up" if ans.healthy else "down", ans.down_reason or "all critical checks pass")
        self.snapshot, self._answer = snap, ans
        self._settled_until = self._next_change(snap, now)

    def _journal_groups(self, snap: Snapshot, now: float) -> None:
        """One "group" entry per change of a verdict group's served verdict (UP/DOWN, as decide() says it for
        the group: its checks, the agent's own condition, the fleet guard; not drain or maint, which are
        "admin" entries), as the node's own verdict is journaled. A group new with a reload starts down."""
        healthy = {}
        for g in snap.groups:
            answer = decide(snap, self.condition, now, g)
            healthy[g] = answer.healthy
            if answer.healthy != self._group_healthy.get(g, False):
                self._journal("group", g, "down" if answer.healthy else "up", "up" if answer.healthy else "down",
                              (answer.note or "all its checks pass") if answer.healthy else answer.down_reason)
        self._group_healthy = healthy

    def _next_change(self, snap: Snapshot, now: float) -> float:
        """The first moment the clock alone can change `snap` or what decide() says about it: a passing check
        goes stale, the first failing check's reason turns to "stale", the loop's recovery ends."""
        until = self.loop_bad_until if self.loop_bad_until > now else math.inf
        for verdict, tally in ((snap.verdict, self.tally),
                               *((g.verdict, self.groups[name][1]) for name, g in snap.groups.items())):
            until = min(until, tally.next_expiry())  # up or down, a passing check going stale changes it
            if verdict.failing:
                until = min(until, tally.views[verdict.failing[0]].fresh_until)
        return until

    def _journal(self, kind: str, name: str, old: str, new: str, reason: str, **extra: object) -> None:
        entry = {"time": time.time(), "kind": kind, "name": name, "from": old, "to": new, "reason": reason,
                 **extra}
        self.journal.append(entry)
        logs.event(f"{kind}_transition", logging.INFO if new in ("up", "ready") else logging.WARNING,
                   **{k: v for k, v in entry.items() if k != "time"})

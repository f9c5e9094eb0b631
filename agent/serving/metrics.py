"""Prometheus exposition: a Collector that reads the state at scrape time, in a private registry."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
    SummaryMetricFamily,
)

from agent import __version__
from agent.model import Admin, Snapshot
from agent.serving.decision import Answer, check_up
from agent.state import AgentState, CheckStats

if TYPE_CHECKING:
    from agent.fleet.guard import FleetGuard


def _histogram(stats: CheckStats) -> tuple[list[tuple[str, float]], float]:
    buckets = [("+Inf" if b == float("inf") else repr(b), float(n)) for b, n in zip(stats.bounds, stats.buckets,
                                                                                    strict=True)]
    return buckets, stats.duration_sum


class StateCollector:
    """Reads the state at scrape time: the node's families, then the verdict groups' and the fleet guard's
    when there are any, then one family per check series."""

    def __init__(self, state: AgentState, hung: Callable[[], int] = lambda: 0):
        self.state = state
        self.hung = hung

    def describe(self) -> list[Metric]:
        return []  # collect() on registration would read a state that may not be complete yet

    def collect(self) -> Iterator[Metric]:
        state = self.state
        try:
            now = asyncio.get_running_loop().time()
        except RuntimeError:  # rendered outside the agent's loop (tests): the loop clock is the monotonic one
            now = time.monotonic()
        snap, answer = state.snapshot, state.answer(now)  # one snapshot for the whole scrape
        yield from self._node(answer)
        if snap.groups:
            yield self._groups(snap, now)
        if state.guard is not None:
            yield from _fleet_families(state.guard, tuple(state.group_guards.values()))
        yield from self._agent(snap, answer)
        yield from self._checks(snap, answer, now)
        yield self._schedule_lag()

    def _node(self, answer: Answer) -> Iterator[Metric]:
        """What the node is served as: up, healthy, live."""
        info = InfoMetricFamily("healthgate_build", "healthgate version")
        info.add_metric([], {"version": __version__})
        yield info
        yield GaugeMetricFamily("healthgate_up", "1 when the node is served as up (/health answers 200)",
                                value=1.0 if answer.up else 0.0)
        yield GaugeMetricFamily("healthgate_verdict_up", "1 when every critical check passes, ignoring drain/maint",
                                value=1.0 if answer.healthy else 0.0)
        yield GaugeMetricFamily("healthgate_live", "1 while the agent's own loop is healthy (/live answers 200)",
                                value=1.0 if answer.live else 0.0)

    def _groups(self, snap: Snapshot, now: float) -> Metric:
        group_up = GaugeMetricFamily("healthgate_group_up",
                                     "1 when the verdict group is served as up (/health/<group> answers 200)",
                                     labels=["group"])
        for g in snap.groups:
            group_up.add_metric([g], 1.0 if self.state.answer(now, g).up else 0.0)
        return group_up

    def _agent(self, snap: Snapshot, answer: Answer) -> Iterator[Metric]:
        """The admin state, the agent's own loop, and what changed since the start: transitions, reloads."""
        state = self.state
        admin = GaugeMetricFamily("healthgate_admin_state", "1 for the admin state in force", labels=["state"])
        for a in Admin:
            admin.add_metric([a.value], 1.0 if answer.admin is a else 0.0)
        yield admin
        yield GaugeMetricFamily("healthgate_event_loop_lag_seconds", "event-loop lag at the last heartbeat",
                                value=state.loop_lag)
        try:
            tasks = len(asyncio.all_tasks())
        except RuntimeError:  # rendered outside the agent's loop
            tasks = 0
        yield GaugeMetricFamily("healthgate_asyncio_tasks", "asyncio tasks alive in the agent (flat when nothing leaks)",
                                value=float(tasks))
        yield GaugeMetricFamily("healthgate_hung_probes", "probes that ignored their timeout and are still running",
                                value=float(self.hung()))
        yield GaugeMetricFamily("healthgate_up_since_timestamp_seconds",
                                "when the served up/down state last changed, unix time", value=snap.since_wall)
        transitions = CounterMetricFamily("healthgate_transitions", "verdict transitions", labels=["to"])
        for to in ("up", "down"):
            transitions.add_metric([to], float(state.transitions[to]))
        yield transitions
        reloads = CounterMetricFamily("healthgate_config_reloads", "successful config reloads")
        reloads.add_metric([], float(state.reloads["success"]))
        yield reloads
        failures = CounterMetricFamily("healthgate_config_reload_failures", "config reloads refused (old one kept)")
        failures.add_metric([], float(state.reloads["failure"]))
        yield failures
        yield GaugeMetricFamily("healthgate_config_last_reload_successful",
                                "1 when the last reload (SIGHUP or a changed file) was applied, 0 when refused",
                                value=1.0 if state.last_reload_ok else 0.0)
        yield GaugeMetricFamily("healthgate_config_last_reload_success_timestamp_seconds",
                                "when a config was last applied (the start counts), unix time",
                                value=state.last_reload_success_wall)

    def _checks(self, snap: Snapshot, answer: Answer, now: float) -> Iterator[Metric]:
        """One family per series, a sample per check: up, the values it observed, failures, durations."""
        up = GaugeMetricFamily("healthgate_check_up", "1 when the check is up and fresh",
                               labels=["check", "type", "critical"])
        value = GaugeMetricFamily("healthgate_check_value", "the value a check observed, in the unit named",
                                  labels=["check", "series", "unit"])
        fails = GaugeMetricFamily("healthgate_check_consecutive_failures", "failures in a row", labels=["check"])
        durations = HistogramMetricFamily("healthgate_check_duration_seconds", "time one sample took",
                                          labels=["check"])
        errors = CounterMetricFamily("healthgate_check_failures", "failed samples by reason",
                                     labels=["check", "reason"])
        for v in snap.checks:
            up.add_metric([v.name, v.type, str(v.critical).lower()], 1.0 if check_up(answer.fresh, v, now) else 0.0)
            fails.add_metric([v.name], float(v.state.consecutive_fail))
            last = v.state.last
            obs = last.observation if last else None
            if obs is not None:
                if obs.value is not None:
                    value.add_metric([v.name, "value", obs.unit], float(obs.value))
                for series, val, unit in obs.values:
                    value.add_metric([v.name, series, unit], float(val))
            stats = self.state.stats.get(v.name)
            if stats is not None:
                buckets, total = _histogram(stats)
                durations.add_metric([v.name], buckets, total)
                for kind, n in sorted(stats.failures.items()):
                    errors.add_metric([v.name, kind], float(n))
        yield from (up, value, fails, durations, errors)

    def _schedule_lag(self) -> Metric:
        lag = HistogramMetricFamily("healthgate_check_schedule_lag_seconds",
                                    "how late check samples started against their schedule")
        buckets, total = _histogram(self.state.lag_stats)
        lag.add_metric([], buckets, total)
        return lag


def _fleet_families(guard: FleetGuard, group_guards: tuple[FleetGuard, ...] = ()) -> Iterator[Metric]:
    """The fleet guard: its state, its decisions, the group's figures and the store's health. The verdict
    groups' own guards add their state and figures, labelled with their store group (`web:api`)."""
    guards = (guard, *group_guards)
    states = GaugeMetricFamily("healthgate_fleet_guard_state", "1 for the fleet guard's state in force",
                               labels=["group", "state"])
    for g in guards:
        for name in ("none", "held", "granted", "store_unavailable"):
            states.add_metric([g.cfg.group, name], 1.0 if g.view().state == name else 0.0)
    yield states
    for key, help_text in (("expected", "the group's expected size"), ("serving", "members serving, by the store"),
                           ("budget", "how many members may be down for shared reasons")):
        family = GaugeMetricFamily(f"healthgate_fleet_group_{key}", help_text, labels=["group"])
        for g in guards:
            value = getattr(g.view(), key)
            if value is not None:
                family.add_metric([g.cfg.group], float(value))
        if family.samples:
            yield family
    decisions = CounterMetricFamily("healthgate_fleet_guard_decisions", "fleet guard decisions by outcome",
                                    labels=["outcome"])
    for outcome, n in sorted(guard.decisions.items()):
        decisions.add_metric([outcome], float(n))
    yield decisions
    errors = CounterMetricFamily("healthgate_fleet_store_errors", "failed fleet store calls by kind", labels=["kind"])
    for kind, n in sorted(guard.store_errors.items()):
        errors.add_metric([kind], float(n))
    yield errors
    latency = SummaryMetricFamily("healthgate_fleet_store_latency_seconds", "time fleet store calls took",
                                  count_value=guard.latency_count, sum_value=guard.latency_sum)
    yield latency


def make_registry(state: AgentState, hung: Callable[[], int] = lambda: 0) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StateCollector(state, hung))
    ProcessCollector(registry=registry)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)

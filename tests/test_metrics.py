"""The /metrics collector in process: a state built here, a fresh registry, each family read by its samples."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry

from agent import __version__
from agent.config import parse_config
from agent.model import Admin, Observation, Result
from agent.serving.metrics import StateCollector
from agent.state import AgentState
from tests.helpers import PASSING

DB = {"name": "db", "type": "tcp", "port": 5432, "critical": False, "interval": "1s", "timeout": "500ms", "fall": 1}
CONFIG = {"agent": {"allow_root": True}, "checks": [PASSING, DB],
          "groups": {"api": {"checks": ["db"]}, "base": {"checks": ["mem"]}}}
MEMORY = Observation(value=42.5, unit="percent", values=(("available", 2048.0, "bytes"),))


def scraped(state: AgentState) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StateCollector(state, hung=lambda: 3))
    return registry


def built() -> AgentState:
    """mem passing with an observation, db refused twice; a heartbeat now, so the answer is fresh. The
    collector, outside a running loop, reads the monotonic clock: the state is built on it."""
    now = time.monotonic()
    state = AgentState(parse_config(CONFIG), now)
    state.tick(now, 0.0)
    state.record("mem", Result(True, "", "ok", 0.002, now, now, time.time(), MEMORY), now)
    for _ in range(2):
        state.record("db", Result(False, "db: connection refused", "refused", 0.001, now, now, time.time()), now)
    return state


def test_node_families_say_what_the_node_is_served_as() -> None:
    """healthgate_up, _verdict_up and _live follow the answer, and the admin state in force is the one at 1."""
    state = built()
    registry = scraped(state)
    assert registry.get_sample_value("healthgate_up") == 1.0
    assert registry.get_sample_value("healthgate_verdict_up") == 1.0
    assert registry.get_sample_value("healthgate_live") == 1.0
    assert registry.get_sample_value("healthgate_build_info", {"version": __version__}) == 1.0
    assert registry.get_sample_value("healthgate_admin_state", {"state": "ready"}) == 1.0
    state.set_admin(Admin.DRAIN, "deploy")
    assert registry.get_sample_value("healthgate_up") == 0.0
    assert registry.get_sample_value("healthgate_verdict_up") == 1.0  # drain is not the checks' verdict
    assert [registry.get_sample_value("healthgate_admin_state", {"state": a.value}) for a in Admin] == [0.0, 1.0, 0.0]


def test_check_families_carry_each_checks_state_values_and_failures() -> None:
    """Per check: up with its type and criticality, the observed values by series, failures in a row and
    by reason, and a duration histogram counting every sample."""
    registry = scraped(built())
    assert registry.get_sample_value("healthgate_check_up", {"check": "mem", "type": "memory", "critical": "true"}) == 1.0
    assert registry.get_sample_value("healthgate_check_up", {"check": "db", "type": "tcp", "critical": "false"}) == 0.0
    assert registry.get_sample_value("healthgate_check_value",
                                     {"check": "mem", "series": "value", "unit": "percent"}) == 42.5
    assert registry.get_sample_value("healthgate_check_value",
                                     {"check": "mem", "series": "available", "unit": "bytes"}) == 2048.0
    assert registry.get_sample_value("healthgate_check_value", {"check": "db", "series": "value", "unit": ""}) is None
    assert registry.get_sample_value("healthgate_check_consecutive_failures", {"check": "db"}) == 2.0
    assert registry.get_sample_value("healthgate_check_consecutive_failures", {"check": "mem"}) == 0.0
    assert registry.get_sample_value("healthgate_check_failures_total", {"check": "db", "reason": "refused"}) == 2.0
    assert registry.get_sample_value("healthgate_check_duration_seconds_count", {"check": "db"}) == 2.0
    assert registry.get_sample_value("healthgate_check_duration_seconds_sum", {"check": "mem"}) == 0.002


def test_group_families_follow_each_groups_own_verdict() -> None:
    """healthgate_group_up is 1 for a group whose checks pass and 0 for one whose check fails, whatever the
    node's own verdict (db is not critical: the node is up)."""
    registry = scraped(built())
    assert registry.get_sample_value("healthgate_group_up", {"group": "base"}) == 1.0
    assert registry.get_sample_value("healthgate_group_up", {"group": "api"}) == 0.0
    assert registry.get_sample_value("healthgate_fleet_guard_state", {"group": "base", "state": "none"}) is None


def test_agent_families_count_reloads_lag_and_hung_probes() -> None:
    """A refused reload counts and clears last_reload_successful; the loop lag, the hung probes and the
    schedule lag of the samples are read from the state at scrape time."""
    state = built()
    state.reloaded(False)
    state.schedule_lag(0.05)
    state.tick(time.monotonic(), 0.004)
    registry = scraped(state)
    assert registry.get_sample_value("healthgate_config_reloads_total") == 0.0
    assert registry.get_sample_value("healthgate_config_reload_failures_total") == 1.0
    assert registry.get_sample_value("healthgate_config_last_reload_successful") == 0.0
    assert registry.get_sample_value("healthgate_event_loop_lag_seconds") == 0.004
    assert registry.get_sample_value("healthgate_hung_probes") == 3.0
    assert registry.get_sample_value("healthgate_asyncio_tasks") == 0.0  # no loop runs here
    assert registry.get_sample_value("healthgate_check_schedule_lag_seconds_count") == 1.0
    assert registry.get_sample_value("healthgate_transitions_total", {"to": "up"}) == 1.0
    assert registry.get_sample_value("healthgate_transitions_total", {"to": "down"}) == 0.0

"""/health and /ready with ?verbose and ?exclude=, and /health/<check>: all read the snapshot, none probes."""

from __future__ import annotations

import types

import pytest

from agent.cli.admin import set_admin_cli
from agent.model import Admin, Observation
from agent.probes import PROBES
from agent.probes.base import CheckFailed
from tests.helpers import async_wait_for


def switchable() -> tuple[types.ModuleType, dict[str, bool]]:
    """A probe module for `memory` checks whose outcome each test sets by check name."""
    passing: dict[str, bool] = {}
    mod = types.ModuleType("switch")
    mod.Config = PROBES["memory"].Config

    async def probe(cfg, ctx):
        if not passing.get(cfg.name, True):
            raise CheckFailed(f"{cfg.name}: switched off", "switched")
        return Observation(1.0, "ratio")

    mod.probe = probe
    return mod, passing


def check(name: str, critical: bool = True) -> dict:
    return {"name": name, "type": "memory", "interval": "100ms", "timeout": "50ms", "rise": 1, "fall": 1,
            "critical": critical}


@pytest.fixture
async def agent(start_agent):
    """An agent with checks db (failing), cache (failing), api (passing) and a failing non-critical one."""
    mod, passing = switchable()
    passing.update(db=False, cache=False, extra=False)
    running = await start_agent({"checks": [check("db"), check("cache"), check("api"),
                                            check("extra", critical=False)]},
                                probes={**PROBES, "memory": mod})

    async def settled() -> bool:
        snap = running.state.snapshot
        return all(v.state.last is not None for v in snap.checks) and snap.verdict.failing == ("db", "cache")

    await async_wait_for(settled, what="first results")
    running.passing = passing
    return running


async def test_verbose_lists_every_check_like_readyz(agent) -> None:
    """?verbose answers one [+]/[-] line per check with the reason, then the agent's own lines and the verdict."""
    code, body = await agent.get("/ready?verbose")
    assert code == 503
    assert body.splitlines() == [
        "[-]db failed: db: switched off",
        "[-]cache failed: cache: switched off",
        "[+]api ok",
        "[-]extra failed (not critical): extra: switched off",
        "[+]agent:serving ok",
        "[+]agent:admin ok",
        "healthz check failed",
    ]
    assert (await agent.get("/health?verbose"))[1] == body


async def test_plain_health_is_unchanged(agent) -> None:
    """Without a query string /health answers the bare word, as before."""
    assert await agent.get("/health") == (503, "down\n")
    agent.passing.update(db=True, cache=True)
    await async_wait_for(lambda: _up(agent), what="up")
    assert await agent.get("/health") == (200, "up\n")


async def _up(agent) -> bool:
    return (await agent.get("/health"))[0] == 200


async def test_exclude_is_repeatable_and_lifts_only_the_named_checks(agent) -> None:
    """Excluded checks don't count for that request; every failing critical check must be excluded to pass."""
    assert (await agent.get("/health?exclude=db"))[0] == 503
    assert await agent.get("/health?exclude=db&exclude=cache") == (200, "up\n")
    code, body = await agent.get("/ready?verbose&exclude=db&exclude=cache")
    assert code == 200
    lines = body.splitlines()
    assert lines[:3] == ["[+]db excluded: ok", "[+]cache excluded: ok", "[+]api ok"]
    assert lines[-1] == "healthz check passed"
    # The served verdict itself is untouched by a request's exclusions.
    assert await agent.get("/health") == (503, "down\n")
    assert agent.state.snapshot.verdict.failing == ("db", "cache")


async def _admin_is(agent, admin: Admin) -> bool:
    return agent.state.snapshot.admin is admin


async def test_exclude_never_lifts_the_agents_own_reasons(agent) -> None:
    """Drain and shutdown keep the node down whatever is excluded; the agent's lines cannot be excluded."""
    both = "exclude=db&exclude=cache"
    # Through the state file, as `healthgate drain` does: the admin watcher owns the admin fields.
    state_dir = agent.state.config.agent.state_dir
    assert set_admin_cli(state_dir, "drain", "deploy", None)[0] is not None
    await async_wait_for(lambda: _admin_is(agent, Admin.DRAIN), what="drained")
    code, body = await agent.get(f"/health?verbose&{both}&exclude=agent:admin")
    assert code == 503
    assert "[-]agent:admin failed: drain: deploy" in body.splitlines()
    assert body.endswith("healthz check failed\n")
    assert 'no matches for "agent:admin"' in body
    assert set_admin_cli(state_dir, "ready", "", None)[0] is not None
    await async_wait_for(lambda: _admin_is(agent, Admin.READY), what="ready again")
    assert (await agent.get(f"/health?{both}"))[0] == 200
    loop_time = agent.state.snapshot.computed_at
    agent.state.set_stopping(loop_time)
    code, body = await agent.get(f"/health?verbose&{both}")
    assert code == 503 and "[-]agent:serving failed: shutting down" in body.splitlines()


async def test_unknown_exclusion_warns_and_changes_nothing(agent) -> None:
    """Excluding a check that does not exist is reported, quoted, in the verbose output and moves nothing."""
    code, body = await agent.get("/health?verbose&exclude=nosuch&exclude=&exclude=x%0Ahealthz+check+passed")
    assert code == 503
    assert body.splitlines()[-2:] == [
        'warn: some health checks cannot be excluded: no matches for "nosuch", "x\\nhealthz check passed"',
        "healthz check failed"]


async def test_one_check_endpoint(agent) -> None:
    """/health/<check> answers that check's own state: 200, 503 with the reason, 404 for an unknown name."""
    assert await agent.get("/health/api") == (200, "up\n")
    assert await agent.get("/ready/db") == (503, "down: db: switched off\n")
    assert await agent.get("/health/extra") == (503, "down: extra: switched off\n")
    assert await agent.get("/health/nosuch") == (404, 'unknown check: "nosuch"\n')
    async with agent.session.head(agent.url + "/health/api") as resp:
        assert resp.status == 200
    agent.passing["db"] = True
    await async_wait_for(lambda: _status(agent, "/health/db", 200), what="db up")
    # The node is still down (cache), but db's own endpoint says db is fine.
    assert (await agent.get("/health"))[0] == 503


async def _status(agent, path: str, code: int) -> bool:
    return (await agent.get(path))[0] == code


async def test_verbose_reasons_need_loopback_or_token() -> None:
    """A client that may not see /status details gets `reason withheld`, as kube-apiserver does."""
    from agent.model import CheckState, CheckView, Snapshot, Status, Verdict
    from agent.serving.decision import Condition, decide
    from agent.serving.http_api import verbose_lines

    down = CheckView("db", "tcp", True, CheckState(status=Status.DOWN, change_reason="refused"))
    snap = Snapshot(verdict=Verdict(False, "db: refused", ("db",)), admin=Admin.MAINT, admin_reason="disk swap",
                    checks=(down,), computed_at=0.0, since=0.0, since_wall=0.0, loop_lag=0.0)
    cond = Condition(heartbeat=0.0, loop_ok_at=0.0, loop_reason="", stopping=False, max_age=0.5, drain_status=503)
    fresh, stalled = decide(snap, cond, 0.1), decide(snap, cond, 5.0)
    assert verbose_lines(snap, fresh, 0.1, frozenset(), reasons=False) == [
        "[-]db failed: reason withheld", "[+]agent:serving ok", "[-]agent:admin failed: reason withheld"]
    assert verbose_lines(snap, stalled, 5.0, frozenset(), reasons=True) == [
        "[-]db failed: agent stalled: no fresh verdict",
        "[-]agent:serving failed: agent stalled: no fresh verdict", "[-]agent:admin failed: maint: disk swap"]


async def test_reasons_are_withheld_from_an_untrusted_client_without_the_token(start_agent, tmp_path) -> None:
    """From a network that is not trusted, ?verbose and /health/<check> say up or down but withhold every
    reason, unless the client presents the status token."""
    token = tmp_path / "status.token"
    token.write_text("t0ken-for-details\n")
    token.chmod(0o600)
    mod, passing = switchable()
    passing.update(db=False)
    agent = await start_agent({"server": {"trusted_networks": [], "status_token_file": str(token)},
                               "checks": [check("db"), check("api")]}, probes={**PROBES, "memory": mod})

    async def db_down() -> bool:
        return agent.state.snapshot.verdict.failing == ("db",)

    await async_wait_for(db_down, what="db down")
    code, body = await agent.get("/health?verbose")
    assert code == 503 and "switched off" not in body
    assert "[-]db failed: reason withheld" in body.splitlines()
    assert await agent.get("/health/db") == (503, "down\n")
    bearer = {"Authorization": "Bearer t0ken-for-details"}
    assert "[-]db failed: db: switched off" in (await agent.get("/health?verbose", headers=bearer))[1].splitlines()
    assert await agent.get("/health/db", headers=bearer) == (503, "down: db: switched off\n")

"""Verdict groups: /health/<group>, /ready/<group> and agent-send <group>, each with its own checks."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
from pathlib import Path

import pytest

from agent.app import Agent
from agent.cli.admin import set_admin_cli
from agent.config import ConfigError, parse_config
from tests.helpers import ROOT, async_wait_for, free_port, toml_table, wait_for
from tests.test_admin import run_cli
from tests.test_haproxy_e2e import Dependency, dependency, haproxy  # noqa: F401 - fixtures
from tests.test_lifecycle import MEM as TOML_MEM

BASE = {"agent": {"allow_root": True}}


def tcp(name: str, port: int, **kw) -> dict:
    return {"name": name, "type": "tcp", "port": port, "interval": "200ms", "timeout": "150ms", "rise": 1,
            "fall": 1, **kw}


MEM = {"name": "mem", "type": "memory", "interval": "200ms", "timeout": "100ms", "rise": 1, "max_used_percent": 100}


@pytest.mark.parametrize("groups, message", [
    ({"api": {"checks": ["db", "nope"]}}, "groups.api.checks[1]: no check named 'nope'"),
    ({"db": {"checks": ["mem"]}}, "groups.db: a check has the same name; /health/db would be ambiguous"),
    ({"api": {"checks": []}}, "groups.api.checks: a group needs at least one check, or it would be UP with nothing checked"),
    ({"bad name": {"checks": ["mem"]}}, "groups.bad name: a group name is letters, digits, _ . - (at most 63)"),
    ({"api": {"checks": ["mem"], "critical": True}}, "groups.api.critical: unknown key"),
])
def test_group_config_errors(groups: dict, message: str) -> None:
    """A group names existing checks, shares one namespace with them, and is never empty."""
    with pytest.raises(ConfigError) as e:
        parse_config({**BASE, "checks": [MEM, tcp("db", 1)], "groups": groups})
    assert message in e.value.errors


async def _code(agent, path: str) -> int:
    return (await agent.get(path))[0]


@pytest.mark.parametrize("fast", [True, False])
async def test_each_group_follows_its_own_checks(start_agent, dependency: Dependency, fast: bool) -> None:  # noqa: F811
    """Killing the API group's database takes /health/api (and /ready/api) down, leaves /health/static
    up, and takes the node's /health down (it needs every critical check): on the fast path and without."""
    agent = await start_agent({"server": {"fast_health": fast}, "checks": [MEM, tcp("db", dependency.port)],
                               "groups": {"api": {"checks": ["db", "mem"]}, "static": {"checks": ["mem"]}}})
    for path in ("/health", "/health/api", "/ready/api", "/health/static", "/ready/static"):
        await async_wait_for(lambda p=path: _is(agent, p, 200), what=f"{path} up")
    await dependency.stop()
    await async_wait_for(lambda: _is(agent, "/health/api", 503), what="api down")
    assert await _code(agent, "/ready/api") == 503
    assert await _code(agent, "/health") == 503
    assert await _code(agent, "/health/static") == 200 and await _code(agent, "/ready/static") == 200
    status, text = await agent.get("/health/api?verbose")
    assert status == 503 and "[-]db failed" in text and "[+]mem ok" in text and "static" not in text
    assert await _code(agent, "/health/api?exclude=db") == 200
    assert await _code(agent, "/health/db") == 503  # a check's own endpoint still works beside groups


async def _is(agent, path: str, code: int) -> bool:
    return await _code(agent, path) == code


async def test_node_conditions_apply_to_every_group_and_a_group_drain_to_its_own(start_agent, tmp_path) -> None:
    """A node-wide drain drains every group; a group's own drain drains that group only; shutdown takes
    every group down. (Drain and maintenance through the state file, as the commands set them: the admin
    watcher owns the state's admin fields and applies the file over anything set beside it.)"""
    agent = await start_agent({"checks": [MEM], "groups": {"a": {"checks": ["mem"]}, "b": {"checks": ["mem"]}}})
    await async_wait_for(lambda: _is(agent, "/health/a", 200), what="a up")
    state_dir = str(tmp_path / "state")

    async def codes() -> list[int]:
        return [await _code(agent, p) for p in ("/health", "/health/a", "/health/b")]

    assert set_admin_cli(state_dir, "drain", "deploy", None)[0] is not None
    await async_wait_for(lambda: _is(agent, "/health", 503), what="drained")
    assert await codes() == [503, 503, 503]
    assert set_admin_cli(state_dir, "ready", "", None)[0] is not None
    assert set_admin_cli(state_dir, "maint", "reindex", None, group="a")[0] is not None
    await async_wait_for(lambda: _is(agent, "/health", 200), what="the node ready again")
    await async_wait_for(lambda: _is(agent, "/health/a", 503), what="a in maintenance")
    assert await codes() == [200, 503, 200]
    loop = asyncio.get_running_loop()
    assert agent.state.answer(loop.time(), "a").state == "maint"
    assert set_admin_cli(state_dir, "ready", "", None, group="a")[0] is not None
    await async_wait_for(lambda: _is(agent, "/health/a", 200), what="a ready again")
    agent.state.set_stopping(loop.time())
    assert [await _code(agent, p) for p in ("/health", "/health/a", "/health/b")] == [503, 503, 503]


async def _agent_check(port: int, send: bytes) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        if send:
            writer.write(send)
            await writer.drain()
        return (await asyncio.wait_for(reader.readline(), 3)).decode()
    finally:
        writer.close()


async def test_agent_check_answers_the_group_agent_send_names(start_agent, dependency: Dependency) -> None:  # noqa: F811
    """One agent-check listener answers every group: agent-send "api\\n" gets the API group's verdict, a
    connection that sends nothing the node's, and an unknown name a DOWN that says so."""
    agent = await start_agent({"agent_check": {"listen": "127.0.0.1:0", "weight_source": "off"},
                               "checks": [MEM, tcp("db", dependency.port)],
                               "groups": {"api": {"checks": ["db"]}, "static": {"checks": ["mem"]}}})
    port = agent.agent.agent_check_address[1]
    await async_wait_for(lambda: _is(agent, "/health", 200), what="up")
    await dependency.stop()
    await async_wait_for(lambda: _is(agent, "/health/api", 503), what="api down")
    assert (await _agent_check(port, b"api\n")).startswith("down ready #db: ")
    assert await _agent_check(port, b"static\n") == "up ready 100%\n"
    assert (await _agent_check(port, b"")).startswith("down ready #db: ")
    assert await _agent_check(port, b"apl\n") == "down ready #unknown group 'apl'\n"


def _group_backends(http: int, agent: int) -> str:
    """The api and static backends of deploy/haproxy/haproxy.cfg, pointed at this test's agent."""
    text = (ROOT / "deploy" / "haproxy" / "haproxy.cfg").read_text()
    blocks = re.findall(r"^backend (?:api|static)\n(?:    .*\n)+", text, re.M)
    assert len(blocks) == 2, blocks
    out = "".join(blocks).replace("server web1 10.0.0.11:80", "server n1 127.0.0.1:{app}")
    out = out.replace("port 8080", "port {http}").replace("agent-port 8081", "agent-port {agent}")
    out = out.replace("inter 1s", "inter 250ms")
    return ("global\n  stats socket {sock} mode 600 level admin\ndefaults\n  mode http\n  timeout connect 1s\n"
            "  timeout client 5s\n  timeout server 5s\n  timeout check 1s\n" + out)


@pytest.mark.e2e
async def test_real_haproxy_with_two_backends_follows_each_group(haproxy, dependency: Dependency,  # noqa: F811
                                                                 tmp_path: Path) -> None:
    """HAProxy, configured as deploy/haproxy/haproxy.cfg's api and static backends (agent-send and
    /health/<group>), shows the node DOWN in the API backend and UP in the static one when only the API's
    database fails, UP in both again when it returns, and DRAIN in the API backend alone when that group is
    drained."""
    cfg = parse_config({
        "server": {"listen": "127.0.0.1:0"}, "agent": {"state_dir": str(tmp_path / "state")},
        "agent_check": {"listen": "127.0.0.1:0", "weight_source": "off"},
        "checks": [MEM, tcp("db", dependency.port)],
        "groups": {"api": {"checks": ["db", "mem"]}, "static": {"checks": ["mem"]}},
    })
    agent = Agent(cfg)
    await agent.start()
    try:
        h = haproxy(agent.address[1], agent.agent_check_address[1], _group_backends(0, 0))
        await h.wait(lambda s: {b: v["status"] for b, v in s.items()} == {"api": "UP", "static": "UP"},
                     timeout=15, what="both UP")
        await dependency.stop()
        await h.wait(lambda s: s["api"]["status"].startswith("DOWN") and s["static"]["status"] == "UP", timeout=10,
                     what="api DOWN, static UP")
        servers = await h.servers()
        assert "db: tcp" in servers["api"]["agent"] and servers["static"]["agent"] == "via agent : up", servers
        await dependency.start()
        await h.wait(lambda s: {b: v["status"] for b, v in s.items()} == {"api": "UP", "static": "UP"},
                     timeout=15, what="both UP again")
        # `healthgate drain --group api`: HAProxy drains the node in the API backend alone.
        assert set_admin_cli(str(tmp_path / "state"), "drain", "reindex", None, group="api")[0] is not None
        # (admin 8 is HAProxy's forced drain; /health/api's 503 then takes it DOWN too, as docs/haproxy.md's soft
        # drain says; the static backend is untouched.)
        await h.wait(lambda s: s["api"]["admin"] == 8 and "reindex" in s["api"]["agent"]
                     and (s["static"]["status"], s["static"]["admin"]) == ("UP", 0), timeout=10,
                     what="api drained, static UP and ready")
    finally:
        await agent.stop()


async def test_status_and_metrics_show_groups(start_agent, dependency: Dependency) -> None:  # noqa: F811
    """/status lists each group's verdict and checks; /metrics has healthgate_group_up{group}."""
    agent = await start_agent({"server": {"status_token_file": None},
                               "checks": [MEM, tcp("db", dependency.port)],
                               "groups": {"api": {"checks": ["db", "mem"]}, "static": {"checks": ["mem"]}}})
    await async_wait_for(lambda: _is(agent, "/health", 200), what="up")
    await dependency.stop()
    await async_wait_for(lambda: _is(agent, "/health/api", 503), what="api down")
    import json

    body = json.loads((await agent.get("/status", headers={"Accept": "application/json"}))[1])
    assert body["groups"]["static"] == {"status": "pass", "state": "up", "output": "", "failing": [],
                                        "checks": ["mem"], "admin": "ready", "adminReason": "", "adminUntil": None}
    api = body["groups"]["api"]
    assert api["status"] == "fail" and api["failing"] == ["db"] and api["output"].startswith("db: ")
    metrics = (await agent.get("/metrics"))[1]
    assert 'healthgate_group_up{group="api"} 0.0' in metrics and 'healthgate_group_up{group="static"} 1.0' in metrics


# -- a group drained alone: `healthgate drain|maint|ready --group NAME` --------------------------------------

GROUPS_TOML = """
[server]
listen = "127.0.0.1:{port}"
shutdown_drain = "0s"
trusted_networks = ["127.0.0.1/32"]
[agent]
allow_root = true
state_dir = "%s"
[agent_check]
listen = "127.0.0.1:%d"
weight_source = "off"
[groups.api]
checks = ["mem"]
[groups.static]
checks = ["mem"]
""" + TOML_MEM % "mem"


def _codes(agent) -> list[int]:
    return [agent.get(p)[0] for p in ("/health", "/health/api", "/health/static")]


def _ask(port: int, send: bytes) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=3) as s:
        s.sendall(send)
        return s.makefile().readline()


def test_group_drain_with_the_cli_against_a_running_agent(agent_process, tmp_path: Path) -> None:
    """`drain --group api` drains the api group alone, confirmed: /health/api answers 503 and HAProxy's agent-
    send "api" gets `drain`, while /health, /health/static and agent-send "static" stay up and ready. A node-
    wide drain and ready leave the group's drain in place; `ready --group api` ends it; an unknown group is a
    config error."""
    state_dir, check_port = tmp_path / "state", free_port()
    agent = agent_process(GROUPS_TOML % (state_dir, check_port))
    cfg = str(agent.path)
    wait_for(lambda: _codes(agent) == [200, 200, 200], what="all up")

    proc = run_cli("drain", "-c", cfg, "--group", "api", "--reason", "reindex")
    assert (proc.returncode, proc.stderr) == (0, ""), proc.stderr
    assert proc.stdout.startswith("drain group api: reindex (")
    assert _codes(agent) == [200, 503, 200]
    assert _ask(check_port, b"api\n") == "up drain 100% #reindex\n"
    assert _ask(check_port, b"static\n") == "up ready 100%\n"
    body = json.loads(agent.get("/status")[1])
    assert body["healthgate"]["admin"] == "ready"
    api = body["groups"]["api"]
    assert (api["state"], api["admin"], api["adminReason"], api["output"]) == ("drain", "drain", "reindex",
                                                                               "drain: reindex")
    on_disk = json.loads((state_dir / "admin.json").read_text())
    assert on_disk["admin"] == "ready" and on_disk["groups"]["api"]["admin"] == "drain"

    assert run_cli("drain", "-c", cfg, "--reason", "deploy").returncode == 0  # the node: every group
    assert _codes(agent) == [503, 503, 503]
    assert run_cli("ready", "-c", cfg).returncode == 0  # the node's drain ends; the group's stays
    assert _codes(agent) == [200, 503, 200]

    proc = run_cli("ready", "-c", cfg, "--group", "api")
    assert (proc.returncode, proc.stderr) == (0, ""), proc.stderr
    assert _codes(agent) == [200, 200, 200]
    assert _ask(check_port, b"api\n") == "up ready 100%\n"
    assert "groups" not in json.loads((state_dir / "admin.json").read_text())

    proc = run_cli("maint", "-c", cfg, "--group", "apl")
    assert proc.returncode == 2
    assert f"{cfg}: --group: no group named 'apl' in groups (known: api, static)" in proc.stderr
    log = agent.logs()
    assert '"name": "group:api", "from": "ready", "to": "drain", "reason": "reindex"' in log


def test_group_maintenance_survives_a_restart_and_expires(agent_process, tmp_path: Path) -> None:
    """`maint --group api --for` is in the state file: an agent started after it serves the group in
    maintenance from its first answer, and the maintenance ends by itself at its expiry."""
    state_dir = tmp_path / "state"
    agent = agent_process(GROUPS_TOML % (state_dir, free_port()))
    wait_for(lambda: _codes(agent) == [200, 200, 200], what="all up")
    proc = run_cli("maint", "-c", str(agent.path), "--group", "api", "--for", "4s", "--reason", "rebuild")
    assert proc.returncode == 0 and " until " in proc.stdout, proc.stderr
    agent.stop()
    again = agent_process(GROUPS_TOML % (state_dir, free_port()))
    assert again.get("/health/api")[0] == 503  # from the very first answer, before any check result
    wait_for(lambda: _codes(again) == [200, 503, 200], what="only api in maintenance")
    assert json.loads(again.get("/status")[1])["groups"]["api"]["state"] == "maint"
    wait_for(lambda: _codes(again) == [200, 200, 200], timeout=6, what="the maintenance expired")


# -- status, explain, the admin endpoint and the journal, per group ------------------------------------------

def status_toml(state_dir: Path, check_port: int, db_port: int) -> str:
    """GROUPS_TOML with a database in the api group."""
    text = GROUPS_TOML.replace('[groups.api]\nchecks = ["mem"]', '[groups.api]\nchecks = ["db", "mem"]')
    return text % (state_dir, check_port) + toml_table("[[checks]]", **tcp("db", db_port))


def test_status_and_explain_show_each_group(agent_process, tmp_path: Path) -> None:
    """With the API's database refused and the static group drained alone (over the admin socket, with --for):
    `status` lists both groups under 100 columns (api DOWN with the database's reason, static UP and drained
    until its expiry), `explain` says why api is down, and `--group` focuses either command on one group with
    the group's exit code; an unknown group is exit 3, as any state unknown from here."""
    db_port = free_port()
    agent = agent_process(status_toml(tmp_path / "state", free_port(), db_port))
    cfg = str(agent.path)
    wait_for(lambda: _codes(agent) == [503, 503, 200], what="api down, static up")

    proc = run_cli("drain", "-c", cfg, "--group", "static", "--for", "1h", "--reason", "reindex")
    assert proc.returncode == 0 and "applied by the agent" in proc.stdout, proc.stdout + proc.stderr
    assert proc.stdout.startswith("drain group static until ")
    until = json.loads(agent.get("/status")[1])["groups"]["static"]["adminUntil"]
    assert until is not None and until.endswith("Z")
    hhmmss = until[11:19]

    out = run_cli("status", "-c", cfg, "--wide")  # reasons in full: the tables are cut to 80 columns off a terminal
    assert out.returncode == 2, out.stderr
    section = out.stdout.split("\nGROUPS\n")[1].split("\n\n")[0].splitlines()
    assert section[0].split() == ["GROUP", "VERDICT", "ADMIN", "CHECKS", "REASON"]
    rows = {line.split()[0]: line for line in section[1:]}
    assert rows["api"].split()[:3] == ["api", "DOWN", "ready"]
    assert rows["api"].endswith(f"db: tcp 127.0.0.1:{db_port}: connection refused")
    assert rows["static"].split()[:5] == ["static", "UP", "drain", "until", hhmmss]
    assert rows["static"].endswith("reindex")
    assert all(len(line) < 100 for line in section), section

    why = run_cli("explain", "-c", cfg)
    assert why.returncode == 2
    assert (f"Its verdict groups: api is DOWN because db fails (db: tcp 127.0.0.1:{db_port}: connection refused); "
            f"static is UP, drained alone (reindex) until {hhmmss} UTC.") in why.stdout

    api = run_cli("status", "-c", cfg, "--group", "api")
    assert api.returncode == 2, api.stderr
    lines = api.stdout.splitlines()
    assert lines[0].startswith("DOWN  group api on ") and lines[1] == f"db: tcp 127.0.0.1:{db_port}: connection refused"
    assert lines[2] == "verdict DOWN, admin ready; checks: mem, db"
    assert {line.split()[0] for line in lines[5:7]} == {"db", "mem"} and "GROUPS" not in api.stdout
    static = run_cli("status", "-c", cfg, "--group", "static", "-n", "0")
    assert static.returncode == 2 and static.stdout.startswith("DRAIN  group static on ")
    assert f"verdict UP, admin drain until {hhmmss}; checks: mem" in static.stdout and "db" not in static.stdout

    why = run_cli("explain", "-c", cfg, "--group", "api")
    assert why.returncode == 2
    assert why.stdout.startswith("Group api on ") and " is DOWN because 1 check fails: db (tcp): tcp 127.0.0.1:" in why.stdout
    why = run_cli("explain", "-c", cfg, "--group", "static")
    assert why.returncode == 2
    assert (f"is out of its backends by an operator: DRAIN (reindex) until {hhmmss} UTC, the group alone"
            in why.stdout)

    assert run_cli("ready", "-c", cfg, "--group", "static").returncode == 0
    assert run_cli("explain", "-c", cfg, "--group", "static").returncode == 0
    for cmd in ("status", "explain"):
        bad = run_cli(cmd, "-c", cfg, "--group", "apl")
        assert bad.returncode == 3 and bad.stdout == ""
        assert "healthgate: --group: the agent has no group named 'apl' (known: api, static)" in bad.stderr


def _post(sock: str, target: str) -> tuple[int, dict]:
    from agent.cli.remote import unix_request

    code, raw = unix_request(sock, "POST", target, {}, 3.0)
    return code, json.loads(raw)


async def test_admin_endpoint_takes_a_group(start_agent, tmp_path: Path) -> None:
    """POST /admin/maint?group=api&for=10m over the admin socket puts the api group alone in maintenance, its
    expiry in /status as groups.api.adminUntil; /admin/ready?group=api ends it; an unknown group is a 400
    that names the known ones, and nothing is written."""
    sock = str(tmp_path / "admin.sock")
    agent = await start_agent({"server": {"admin_socket": sock}, "checks": [MEM],
                               "groups": {"api": {"checks": ["mem"]}, "static": {"checks": ["mem"]}}})
    await async_wait_for(lambda: _is(agent, "/health/api", 200), what="api up")
    code, body = await asyncio.to_thread(_post, sock, "/admin/maint?group=api&for=10m&reason=rebuild")
    assert code == 200, body
    assert (body["admin"], body["group"], body["reason"]) == ("maint", "api", "rebuild") and body["until"]
    assert [await _code(agent, p) for p in ("/health", "/health/api", "/health/static")] == [200, 503, 200]
    status = json.loads((await agent.get("/status"))[1])
    assert status["healthgate"]["admin"] == "ready" and status["healthgate"]["adminUntil"] is None
    api = status["groups"]["api"]
    assert (api["admin"], api["adminReason"], api["adminUntil"]) == ("maint", "rebuild", body["until"])

    code, body = await asyncio.to_thread(_post, sock, "/admin/drain?group=apl")
    assert code == 400 and body["error"] == 'group: no group named "apl" (known: api, static)'
    code, body = await asyncio.to_thread(_post, sock, "/admin/ready?group=api")
    assert code == 200 and body["group"] == "api"
    assert [await _code(agent, p) for p in ("/health", "/health/api", "/health/static")] == [200, 200, 200]
    assert "groups" not in json.loads((tmp_path / "state" / "admin.json").read_text())


async def test_journal_records_each_group_change_once(start_agent, dependency: Dependency,  # noqa: F811
                                                      caplog: pytest.LogCaptureFixture) -> None:
    """The journal (and the log) has one "group" entry per change of a group's verdict, named by the group:
    api down -> up -> down -> up as its database comes and goes, static down -> up once; the node's entries
    stay "verdict"/"node", and a group's drain is an "admin" entry, not a verdict change."""
    caplog.set_level(logging.INFO, logger="healthgate")
    agent = await start_agent({"checks": [MEM, tcp("db", dependency.port)],
                               "groups": {"api": {"checks": ["db"]}, "static": {"checks": ["mem"]}}})
    await async_wait_for(lambda: _is(agent, "/health/api", 200), what="api up")
    await dependency.stop()
    await async_wait_for(lambda: _is(agent, "/health/api", 503), what="api down")
    await dependency.start()
    await async_wait_for(lambda: _is(agent, "/health/api", 200), what="api up again")
    assert set_admin_cli(agent.state.config.agent.state_dir, "drain", "reindex", None, group="static")[0]
    await async_wait_for(lambda: _is(agent, "/health/static", 503), what="static drained")
    beat = agent.state.heartbeat  # the heartbeats and refreshes of the next half second add nothing

    async def later() -> bool:
        return agent.state.heartbeat > beat + 0.5

    await async_wait_for(later, what="half a second of heartbeats")
    entries = json.loads((await agent.get("/status/journal"))[1])["entries"]
    groups = [(e["name"], e["from"], e["to"]) for e in entries if e["kind"] == "group"]
    assert [g for g in groups if g[0] == "api"] == [("api", "down", "up"), ("api", "up", "down"), ("api", "down", "up")]
    assert [g for g in groups if g[0] == "static"] == [("static", "down", "up")]
    api_down = next(e for e in entries if e["kind"] == "group" and e["to"] == "down")
    assert api_down["reason"].startswith("db: tcp 127.0.0.1:")
    assert any((e["kind"], e["name"], e["to"]) == ("admin", "group:static", "drain") for e in entries)
    assert [e["to"] for e in entries if e["kind"] == "verdict"] == ["up", "down", "up"]
    logged = [(r.fields["name"], r.fields["to"]) for r in caplog.records if r.getMessage() == "group_transition"]
    assert logged == [(n, to) for n, _, to in groups]

"""Drain and maintenance: the state file, the CLI against a running agent, expiry, restarts, the admin endpoints."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from agent import admin as admin_mod
from agent.admin import (
    AdminRecord,
    AdminWriteError,
    make_record,
    read_record,
    sanitize,
    setting_group,
    state_path,
    update_record,
    write_record,
)
from agent.cli.admin import set_admin_cli
from agent.cli.main import main as cli_main
from agent.model import Admin
from agent.serving import admin_watch
from tests.helpers import PASSING, ROOT, async_wait_for, memory_check, wait_for
from tests.test_haproxy_agent import MEM
from tests.test_lifecycle import MEM as TOML_MEM

# -- the state file ------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, limit, expected", [
    ("deploy 42", 200, "deploy 42"),
    ("  two\n lines\t here ", 200, "two lines here"),
    ("bell\x07 esc\x1b[0m", 200, "bell? esc?[0m"),
    ("café", 200, "caf?"),
    ("x" * 50, 20, "x" * 17 + "..."),
])
def test_sanitize(text: str, limit: int, expected: str) -> None:
    """Reasons become one bounded line of printable ASCII."""
    assert sanitize(text, limit) == expected


@pytest.mark.parametrize("content, admin, reason_part", [
    (None, Admin.READY, ""),  # no file: ready
    (b'{"admin": "drain", "reason": "deploy", "until": null}', Admin.DRAIN, "deploy"),
    (b'{"admin": "maint", "reason": "x\\ny", "until": 1e12, "set_at": 1.0, "source": "cli"}', Admin.MAINT, "x y"),
    (b"", Admin.MAINT, "invalid: not JSON"),  # anything unusable: maintenance (fail closed)
    (b"\xff\xfe", Admin.MAINT, "invalid: not JSON"),
    (b"[1, 2]", Admin.MAINT, "invalid: not a JSON object"),
    (b'{"admin": "vacation"}', Admin.MAINT, "invalid: admin: 'vacation' is not one of ready, drain, maint"),
    (b'{"admin": "drain", "until": "tomorrow"}', Admin.MAINT, "invalid: until: not a number"),
    (b'{"admin": "drain", "reason": 7}', Admin.MAINT, "invalid: reason: not a string"),
    # An expiry that is no usable time: NaN never expires, 1e400 is JSON's infinity, 1e300 no date at all.
    (b'{"admin": "ready", "until": 1e400}', Admin.MAINT, "invalid: until: inf is not a usable time"),
    (b'{"admin": "drain", "until": NaN}', Admin.MAINT, "invalid: until: nan is not a usable time"),
    (b'{"admin": "maint", "until": 1e300}', Admin.MAINT, "invalid: until: 1e+300 is not a usable time"),
    (b'{"admin": "drain", "until": -1}', Admin.MAINT, "invalid: until: -1 is not a usable time"),
    (b'{"admin": "drain", "until": 1e12, "set_at": Infinity}', Admin.MAINT, "invalid: set_at: inf is not a usable time"),
    # A group's entry is checked as the node's, its errors named by key path; a broken one fails the node closed.
    (b'{"admin": "ready", "groups": {"api": {"admin": "drain"}}}', Admin.READY, ""),
    (b'{"admin": "ready", "groups": []}', Admin.MAINT, "invalid: groups: not a JSON object"),
    (b'{"admin": "ready", "groups": {"api": {"admin": "drain", "until": "soon"}}}', Admin.MAINT,
     "invalid: groups.api.until: not a number"),
    (b'{"admin": "ready", "groups": {"a b": {"admin": "drain"}}}', Admin.MAINT, "invalid: groups: 'a b' is not a group name"),
])
def test_read_record_fails_closed(tmp_path: Path, content: bytes | None, admin: Admin, reason_part: str) -> None:
    """A missing file is ready; a file that can't be parsed puts the node in maintenance, saying why."""
    path = state_path(tmp_path)
    if content is not None:
        path.write_bytes(content)
    record = read_record(path)
    assert record.admin is admin
    assert reason_part in record.reason


def test_unreadable_state_file_is_maintenance(tmp_path: Path) -> None:
    """A state file that can't be read at all (here: a directory in its place) is maintenance too."""
    state_path(tmp_path).mkdir()
    record = read_record(state_path(tmp_path))
    assert record.admin is Admin.MAINT and "unreadable: Is a directory" in record.reason


def test_write_is_atomic_and_round_trips(tmp_path: Path) -> None:
    """A written record reads back equal, with no temporary file left, creating the directory if needed."""
    d = tmp_path / "new" / "dir"
    record = make_record(Admin.DRAIN, "deploy 42", 600, source="cli", wall=1000.0)
    assert record.until == 1600.0
    path = write_record(d, record)
    assert read_record(path) == record
    assert sorted(p.name for p in d.iterdir()) == ["admin.json"]
    assert path.stat().st_mode & 0o777 == 0o644


def test_group_states_round_trip_beside_the_node_record(tmp_path: Path) -> None:
    """A group's drain is written in the same file as the node's record: a node command keeps it, a group
    command keeps the node's record, `ready --group` removes the entry, an expired entry is dropped at the
    next write, and a file without groups (older agents') reads as none."""
    set_admin_cli(str(tmp_path), "drain", "reindex", None, group="api")
    expired = AdminRecord(Admin.MAINT, "short", until=2.0, set_at=1.0, source="cli")  # ran out long ago
    update_record(tmp_path, setting_group("static", expired))
    assert [g for g, _ in read_record(state_path(tmp_path)).groups] == ["api", "static"]
    set_admin_cli(str(tmp_path), "maint", "kernel", None)
    record = read_record(state_path(tmp_path))
    assert (record.admin, record.reason) == (Admin.MAINT, "kernel")
    assert [g for g, _ in record.groups] == ["api"]  # the node's write dropped the expired entry
    assert (record.group("api").admin, record.group("api").reason) == (Admin.DRAIN, "reindex")
    set_admin_cli(str(tmp_path), "ready", "", None, group="api")
    assert read_record(state_path(tmp_path)).groups == ()
    assert b"groups" not in state_path(tmp_path).read_bytes()  # the file older agents wrote, again
    state_path(tmp_path).write_text('{"admin": "drain", "reason": "old"}')
    assert read_record(state_path(tmp_path)) == AdminRecord(Admin.DRAIN, "old")


def test_group_command_on_an_unusable_file_is_refused(tmp_path: Path) -> None:
    """A group command never writes the agent's made-up maintenance back as if an operator had asked for it:
    on an unusable state file it is refused and the file stays as it is."""
    state_path(tmp_path).write_text("{not json")
    record, written, message = set_admin_cli(str(tmp_path), "drain", "", None, group="api")
    assert record is None and written is None
    assert "invalid: not JSON" in message and "run `healthgate ready`" in message
    assert state_path(tmp_path).read_text() == "{not json"


async def test_http_admin_write_keeps_the_groups(start_agent, tmp_path: Path) -> None:
    """POST /admin/drain replaces the node's record and keeps a group's drain written by the CLI."""
    agent = await start_agent({"checks": [MEM], "groups": {"api": {"checks": [MEM["name"]]}}})
    set_admin_cli(agent.state.config.agent.state_dir, "drain", "reindex", None, group="api")
    await agent.agent.admin.write(make_record(Admin.DRAIN, "deploy", source="http"))
    record = read_record(state_path(agent.state.config.agent.state_dir))
    assert (record.admin, record.group("api").admin) == (Admin.DRAIN, Admin.DRAIN)
    assert agent.state.group_admin == {"api": (Admin.DRAIN, "reindex", None)}


def test_disk_full_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed write (disk full at fsync) raises a clear error, leaves the old file whole and no temporary."""
    old = make_record(Admin.MAINT, "kernel update", source="cli")
    write_record(tmp_path, old)

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(admin_mod.os, "fsync", full)
    with pytest.raises(AdminWriteError, match=r"cannot write .*admin.json: No space left on device"):
        write_record(tmp_path, make_record(Admin.READY, source="cli"))
    monkeypatch.undo()
    assert read_record(state_path(tmp_path)) == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["admin.json"]


def test_cli_disk_full_exits_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """`healthgate drain` on a full disk exits 2 with the file and the system's reason."""
    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(admin_mod.os, "fsync", full)
    assert cli_main(["drain", "--state-dir", str(tmp_path), "--no-wait"]) == 2
    err = capsys.readouterr().err
    assert f"cannot write {tmp_path}/admin.json: No space left on device" in err


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=30, env=env)


def test_cli_unwritable_state_dir_exits_2(tmp_path: Path) -> None:
    """A state directory that can't be created or written is a clear error and exit 2, never a traceback."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    proc = run_cli("maint", "--state-dir", str(blocker / "state"), "--reason", "x")
    assert proc.returncode == 2
    assert f"healthgate: cannot write {blocker}/state/admin.json: Not a directory" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_for_must_be_a_positive_duration(tmp_path: Path) -> None:
    """--for takes a duration; a bad one exits 2 before anything is written."""
    proc = run_cli("drain", "--state-dir", str(tmp_path), "--for", "soon")
    assert proc.returncode == 2 and "is not a duration" in proc.stderr
    proc = run_cli("drain", "--state-dir", str(tmp_path), "--for", "0")
    assert proc.returncode == 2 and "must be a positive duration" in proc.stderr
    assert not state_path(tmp_path).exists()


def test_cli_for_out_of_range_is_a_clear_error(tmp_path: Path) -> None:
    """--for is at most a year: a longer one (even one past any date) exits 2 naming the bound, never a
    traceback, and writes nothing; a year itself is fine."""
    for too_long in ("99999999999999999999h", "8761h", "31536001"):
        proc = run_cli("maint", "--state-dir", str(tmp_path), "--for", too_long)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.endswith("healthgate maint: error: argument --for: must be at most 8760h\n"), proc.stderr
    assert not state_path(tmp_path).exists()
    proc = run_cli("maint", "--state-dir", str(tmp_path), "--for", "8760h", "--no-wait")
    assert proc.returncode == 0 and " until " in proc.stdout, proc.stderr


def test_run_with_an_unusable_expiry_starts_in_maintenance(agent_process, tmp_path: Path) -> None:
    """A state file whose `until` is no usable time (here JSON's infinity) is a corrupt file: `run` starts,
    in maintenance, saying why, instead of crashing; `ready` ends it."""
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    state_path(state_dir).write_bytes(b'{"admin": "drain", "reason": "x", "until": 1e400, "source": "cli"}')
    agent = agent_process(AGENT % (503, state_dir))
    s = status(agent)
    assert s["admin"] == "maint" and "invalid: until: inf is not a usable time" in s["adminReason"]
    assert agent.get("/health")[0] == 503
    assert agent.proc.poll() is None and "Traceback" not in agent.logs()
    assert run_cli("ready", "-c", str(agent.path)).returncode == 0
    wait_for(lambda: agent.get("/health")[0] == 200, what="ready")


def test_running_agent_takes_an_unusable_expiry_as_maintenance(agent_process, tmp_path: Path) -> None:
    """A running, ready agent whose state file gets a NaN `until` goes into maintenance within a poll."""
    state_dir = tmp_path / "state"
    agent = agent_process(AGENT % (503, state_dir))
    wait_for(lambda: agent.get("/health")[0] == 200, what="up")
    state_dir.mkdir(exist_ok=True)
    state_path(state_dir).write_bytes(b'{"admin": "drain", "reason": "x", "until": NaN, "source": "cli"}')
    wait_for(lambda: agent.get("/health")[0] == 503, timeout=3, what="maint")
    s = status(agent)
    assert s["admin"] == "maint" and "invalid: until: nan" in s["adminReason"]


# -- the CLI against a running agent --------------------------------------------------------------------

AGENT = """
[server]
listen = "127.0.0.1:{port}"
shutdown_drain = "0s"
drain_status = %s
trusted_networks = ["127.0.0.1/32"]
[agent]
allow_root = true
state_dir = "%s"
""" + TOML_MEM % "mem"


def status(agent) -> dict:
    return json.loads(agent.get("/status")[1])["healthgate"]


def test_cli_drain_maint_ready_against_running_agent(agent_process, tmp_path: Path) -> None:
    """drain, maint and ready change /health, /status and the log of a running agent within a poll, and the
    command confirms it; drain answers drain_status (404 here, for disable-on-404)."""
    state_dir = tmp_path / "state"
    agent = agent_process(AGENT % (404, state_dir))
    cfg = str(agent.path)
    wait_for(lambda: agent.get("/health")[0] == 200, what="up")

    proc = run_cli("drain", "-c", cfg, "--reason", "deploy 42")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("drain: deploy 42 (") and proc.stderr == ""  # confirmed by the agent
    assert agent.get("/health")[0] == 404
    s = status(agent)
    assert (s["admin"], s["adminReason"], s["adminUntil"]) == ("drain", "deploy 42", None)

    proc = run_cli("maint", "-c", cfg, "--reason", "kernel update")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert agent.get("/health")[0] == 503
    assert status(agent)["admin"] == "maint"

    proc = run_cli("ready", "-c", cfg)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert agent.get("/health")[0] == 200
    log = agent.logs()
    for change in ('"from": "ready", "to": "drain", "reason": "deploy 42"',
                   '"from": "drain", "to": "maint", "reason": "kernel update"',
                   '"from": "maint", "to": "ready", "reason": "ready by '):
        assert change in log


def test_drain_for_expires_by_itself(agent_process, tmp_path: Path) -> None:
    """`drain --for` ends on its own: 503 while it lasts, then 200, and the expiry is logged."""
    agent = agent_process(AGENT % (503, tmp_path / "state"))
    wait_for(lambda: agent.get("/health")[0] == 200, what="up")
    proc = run_cli("drain", "-c", str(agent.path), "--for", "1500ms", "--reason", "short")
    assert proc.returncode == 0 and " until " in proc.stdout, proc.stdout + proc.stderr
    assert agent.get("/health")[0] == 503
    assert status(agent)["adminUntil"] is not None
    wait_for(lambda: agent.get("/health")[0] == 200, timeout=5, what="expiry")
    assert '"from": "drain", "to": "ready", "reason": "drain expired after 1.5s"' in agent.logs()


def test_maintenance_survives_restart(agent_process, tmp_path: Path) -> None:
    """A node in maintenance is still in maintenance from the first answer of a restarted agent."""
    state_dir = tmp_path / "state"
    first = agent_process(AGENT % (503, state_dir))
    assert run_cli("maint", "-c", str(first.path), "--reason", "disk swap").returncode == 0
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(5)
    second = agent_process(AGENT % (503, state_dir), port=first.port)
    s = status(second)
    assert (s["admin"], s["adminReason"]) == ("maint", "disk swap")
    wait_for(lambda: json.loads(second.get("/status")[1])["checks"]["mem:memory"][0]["status"] == "pass",
             what="the check passes")
    assert second.get("/health")[0] == 503  # and maintenance still holds
    assert run_cli("ready", "-c", str(second.path)).returncode == 0
    assert second.get("/health")[0] == 200


def test_unparseable_state_file_fails_closed_until_ready(agent_process, tmp_path: Path) -> None:
    """A state file the agent can't parse puts the node in maintenance with the reason; `ready` ends it."""
    state_dir = tmp_path / "state"
    agent = agent_process(AGENT % (503, state_dir))
    wait_for(lambda: agent.get("/health")[0] == 200, what="up")
    state_path(state_dir).parent.mkdir(parents=True, exist_ok=True)
    state_path(state_dir).write_text("{half a file")
    wait_for(lambda: agent.get("/health")[0] == 503, timeout=3, what="maint")
    s = status(agent)
    assert s["admin"] == "maint" and "invalid: not JSON" in s["adminReason"]
    assert '"event": "admin_state_unusable"' in agent.logs()
    assert run_cli("ready", "-c", str(agent.path)).returncode == 0
    assert agent.get("/health")[0] == 200


def test_cli_confirmation_never_goes_through_a_proxy(agent_process, tmp_path: Path) -> None:
    """drain and maint are confirmed by the agent itself when http_proxy and HTTP_PROXY name a proxy that
    refuses every connection: the command asks its own agent directly, never through a proxy. (No admin
    socket: the command writes the file and confirms over HTTP.)"""
    agent = agent_process((AGENT % (404, tmp_path / "state")).replace("[server]\n", '[server]\nadmin_socket = ""\n', 1))
    wait_for(lambda: agent.get("/health")[0] == 200, what="up")
    with socket.socket() as dead:  # bound, never listening: a connection to it is refused
        dead.bind(("127.0.0.1", 0))
        proxy = f"http://127.0.0.1:{dead.getsockname()[1]}"
        env = {k: v for k, v in os.environ.items() if k.lower() != "no_proxy"}
        env.update(http_proxy=proxy, HTTP_PROXY=proxy)
        for action, code in (("drain", 404), ("maint", 503)):
            proc = run_cli(action, "-c", str(agent.path), "--reason", f"{action} past the proxy", env=env)
            assert (proc.returncode, proc.stderr) == (0, ""), proc.stderr
            assert proc.stdout.startswith(f"{action}: {action} past the proxy (")  # confirmed by the agent
            assert agent.get("/health")[0] == code


def test_cli_exits_1_when_no_agent_confirms(tmp_path: Path) -> None:
    """With no agent running, the state is still written but the command exits 1 saying nobody confirmed it;
    --no-wait writes it and exits 0 without asking."""
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[server]\nlisten = "127.0.0.1:1"\n[agent]\nallow_root = true\nstate_dir = "{tmp_path / "s"}"\n'
                   + memory_check())
    proc = run_cli("maint", "-c", str(cfg))
    assert proc.returncode == 1, proc.stderr
    assert (f"healthgate: maint written to {tmp_path / 's' / 'admin.json'} but not confirmed: the agent did "
            "not answer at http://127.0.0.1:1/status: connection refused (is it running?). The agent applies the file once it reads it") in proc.stderr
    assert read_record(state_path(tmp_path / "s")).admin is Admin.MAINT
    proc = run_cli("drain", "-c", str(cfg), "--no-wait")
    assert (proc.returncode, proc.stderr) == (0, "")
    assert read_record(state_path(tmp_path / "s")).admin is Admin.DRAIN


def test_cli_exits_1_when_the_agent_reads_another_state_file(agent_process, tmp_path: Path) -> None:
    """A command that writes a state file the running agent does not read exits 1 naming both files, even
    when the agent already happens to be in the mode asked for."""
    agent = agent_process(AGENT % (503, tmp_path / "state"))
    assert run_cli("maint", "-c", str(agent.path), "--reason", "rack move").returncode == 0
    other = tmp_path / "other.toml"  # same agent address, another state directory
    other.write_text(agent.path.read_text().replace(str(tmp_path / "state"), str(tmp_path / "elsewhere")))
    for action in ("maint", "ready"):
        proc = run_cli(action, "-c", str(other))
        assert proc.returncode == 1, (action, proc.stdout, proc.stderr)
        assert (f"not confirmed: the agent at {agent.url}/status reads {tmp_path / 'state' / 'admin.json'}, "
                f"not {tmp_path / 'elsewhere' / 'admin.json'}") in proc.stderr
    s = status(agent)
    assert (s["admin"], s["adminReason"]) == ("maint", "rack move")  # untouched by the other file


# -- the admin endpoints ----------------------------------------------------------------------------------

async def post(agent, path: str, token: str | None = None, method: str = "POST", **kw) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with agent.session.request(method, agent.url + path, headers=headers, **kw) as resp:
        return resp.status, await resp.text()


async def test_admin_paths_do_not_exist_without_a_token(start_agent) -> None:
    """Without admin_token_file, /admin/* answers 404 to every method, loopback included."""
    agent = await start_agent({"checks": [MEM]})
    for method in ("POST", "GET", "PUT"):
        assert (await post(agent, "/admin/drain", "anything", method))[0] == 404
    assert (await post(agent, "/admin/maint?for=1m"))[0] == 404
    assert agent.state.admin is Admin.READY


async def test_admin_endpoints_with_a_token(start_agent, tmp_path: Path) -> None:
    """With a token: POST with the bearer token drains, maintains and readies through the state file;
    no token or a wrong one 401, other methods 405, bodies 413, bad parameters 400."""
    token_file = tmp_path / "admin.token"
    token_file.write_text("s3cret-token\n")
    token_file.chmod(0o600)
    agent = await start_agent({"server": {"admin_token_file": str(token_file)}, "checks": [MEM]})
    state_dir = Path(agent.state.config.agent.state_dir)
    await async_wait_for(lambda: _ok(agent), what="up")

    status, body = await post(agent, "/admin/drain")
    assert status == 401 and "bearer token is required" in body
    assert (await post(agent, "/admin/drain", "wrong"))[0] == 401
    assert (await post(agent, "/admin/drain", "s3cret-token", "GET"))[0] == 405
    assert (await post(agent, "/admin/drain", "s3cret-token", data=b"x"))[0] == 413
    assert (await post(agent, "/admin/drain?for=soon", "s3cret-token"))[0] == 400
    assert (await post(agent, "/admin/drain?weight=3", "s3cret-token"))[0] == 400
    assert (await post(agent, "/admin/ready?for=1m", "s3cret-token"))[0] == 400
    status, body = await post(agent, "/admin/maint?for=99999999999999999999h", "s3cret-token")
    assert (status, json.loads(body)) == (400, {"error": "for: must be at most 8760h"})
    assert (await post(agent, "/admin/reboot", "s3cret-token"))[0] == 404
    assert agent.state.admin is Admin.READY and not state_path(state_dir).exists()

    status, body = await post(agent, "/admin/drain?for=10m&reason=deploy%2042", "s3cret-token")
    assert status == 200, body
    reply = json.loads(body)
    assert (reply["admin"], reply["reason"]) == ("drain", "deploy 42") and reply["until"]
    assert (agent.state.admin, agent.state.admin_reason) == (Admin.DRAIN, "deploy 42")
    assert (await agent.get("/health"))[0] == 503
    on_disk = read_record(state_path(state_dir))  # the same file the CLI writes
    assert (on_disk.admin, on_disk.source) == (Admin.DRAIN, "http")

    assert (await post(agent, "/admin/maint?reason=rack%20move", "s3cret-token"))[0] == 200
    assert agent.state.admin is Admin.MAINT
    assert (await post(agent, "/admin/ready", "s3cret-token"))[0] == 200
    assert agent.state.admin is Admin.READY
    assert (await agent.get("/health"))[0] == 200


async def test_admin_endpoint_reports_a_failed_write(start_agent, tmp_path: Path) -> None:
    """When the state file can't be written, the endpoint answers 500 with the reason and nothing changes."""
    token_file = tmp_path / "admin.token"
    token_file.write_text("t0ken")
    token_file.chmod(0o600)
    blocker = tmp_path / "file"
    blocker.write_text("")
    agent = await start_agent({"server": {"admin_token_file": str(token_file)},
                               "agent": {"state_dir": str(blocker / "state")}, "checks": [MEM]})
    status, body = await post(agent, "/admin/maint", "t0ken")
    assert status == 500 and "Not a directory" in json.loads(body)["error"]
    assert agent.state.admin is Admin.READY


async def test_cli_and_http_agree(start_agent, tmp_path: Path) -> None:
    """A state written by the CLI is what the agent serves, and the HTTP endpoint then overrides it."""
    token_file = tmp_path / "admin.token"
    token_file.write_text("t0ken")
    token_file.chmod(0o600)
    agent = await start_agent({"server": {"admin_token_file": str(token_file)}, "checks": [MEM]})
    state_dir = agent.state.config.agent.state_dir
    assert cli_main(["maint", "--state-dir", state_dir, "--reason", "from cli", "--no-wait"]) == 0
    await async_wait_for(lambda: _admin(agent, Admin.MAINT), timeout=3, what="maint from the CLI")
    assert agent.state.admin_reason == "from cli"
    assert (await post(agent, "/admin/ready", "t0ken"))[0] == 200
    assert read_record(state_path(state_dir)).admin is Admin.READY


async def _ok(agent) -> bool:
    return (await agent.get("/health"))[0] == 200


async def _admin(agent, admin: Admin) -> bool:
    return agent.state.admin is admin


def test_record_expiry_is_wall_clock() -> None:
    """Expiry compares wall-clock time, so it survives restarts (and follows clock changes)."""
    r = AdminRecord(Admin.DRAIN, "x", until=100.0, set_at=40.0)
    assert not r.expired(99.9) and r.expired(100.0)
    assert not AdminRecord(Admin.MAINT).expired(1e12)


async def test_state_dir_that_hangs_at_startup_is_maintenance(tmp_path: Path, monkeypatch) -> None:
    """If the state file can't be read at startup in time (a hung mount), the node is in maintenance until
    a read succeeds: the agent can't tell whether an operator asked for it."""
    import asyncio
    import threading

    from agent.config import parse_config
    from agent.state import AgentState

    release = threading.Event()
    monkeypatch.setattr(admin_watch, "READ_TIMEOUT", 0.1)
    state = AgentState(parse_config({"agent": {"state_dir": str(tmp_path)}, "checks": [PASSING]}), asyncio.get_running_loop().time())
    watcher = admin_watch.AdminWatcher(state)
    real_poll = watcher.poll
    monkeypatch.setattr(watcher, "poll", lambda force=False: (release.wait(5), real_poll(force))[1])
    try:
        assert await watcher.sync(force=True) is False
        assert state.admin is Admin.MAINT and "not readable within 0.1s" in state.admin_reason
    finally:
        release.set()
    await async_wait_for(lambda: watcher.sync(), timeout=3, what="a read that completes")
    assert state.admin is Admin.READY

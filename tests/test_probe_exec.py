"""exec with real commands: Nagios codes, output cap, environment allow-list, cwd, user, and the whole group killed."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from pathlib import Path

import pytest

from agent.config import parse_config
from agent.probes.base import Context
from agent.runner import Runner
from tests.helpers import async_wait_for
from tests.probing import check, cli, sample


def sh(script: str, **keys) -> dict:
    return {"type": "exec", "command": ["sh", "-c", script], **keys}


def alive(pid: int) -> bool:
    """Running or sleeping; a zombie (killed, waiting for a parent to reap it) is not alive."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def reapable(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


async def test_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    """A command that forks a grandchild and hangs is killed whole at the timeout: no process is left."""
    leader, grandchild = tmp_path / "leader.pid", tmp_path / "grandchild.pid"
    cfg = check(**sh(f"sleep 300 & echo $! > {grandchild}; echo $$ > {leader}; wait"), timeout=0.5, interval=1)
    runner = Runner(Context())
    r = await runner.run(cfg)
    assert (r.ok, r.kind) == (False, "timeout")
    pids = [int(leader.read_text()), int(grandchild.read_text())]
    assert all(pid > 0 for pid in pids)

    async def none_left() -> bool:
        return not runner.hung and not any(alive(pid) for pid in pids)

    await async_wait_for(none_left, timeout=5, what=f"processes {pids} to be killed")
    assert not reapable(pids[0])  # the command itself was reaped by the probe, not left a zombie


@pytest.mark.parametrize("keys, ok, kind, text", [
    (sh("echo 'OK - all fine'"), True, "ok", "OK - all fine"),
    (sh("echo 'WARNING - load 5'; exit 1"), False, "warning", "WARNING - load 5"),
    (sh("echo 'WARNING - load 5'; exit 1", warning_is_failure=False), True, "ok", "WARNING - load 5"),
    (sh("echo 'DISK CRITICAL - /var 98% used'; exit 2"), False, "critical", "DISK CRITICAL - /var 98% used"),
    (sh("echo 'disk nearly full'; echo second line; exit 2"), False, "critical",
     "exec sh: CRITICAL (exit 2): disk nearly full"),
    (sh("exit 3"), False, "unknown", "exec sh: UNKNOWN (exit 3)"),
    (sh("echo boom >&2; exit 42"), False, "exit", "exec sh: exit 42: boom"),
    (sh("kill -TERM $$"), False, "signal", "exec sh: killed by SIGTERM"),
    ({"type": "exec", "command": ["healthgate-no-such-command"]}, False, "config",
     "exec healthgate-no-such-command: command healthgate-no-such-command: no such file or directory"),
    ({"type": "exec", "command": ["true"], "cwd": "/nonexistent"}, False, "config",
     "exec true: cwd /nonexistent: no such file or directory"),
])
async def test_exit_codes(keys: dict, ok: bool, kind: str, text: str) -> None:
    """Exit 0 passes; Nagios 1 (unless warning_is_failure = false), 2, 3, other codes and signals fail."""
    r = await sample(check(**keys))
    assert (r.ok, r.kind) == (ok, kind)
    assert (r.observation.detail if ok else r.reason) == text


async def test_perfdata_becomes_series() -> None:
    """Nagios performance data after `|` is reported as series in base units; the text before it is the detail."""
    r = await sample(check(**sh("echo 'OK - 3 users | users=3;5;10 time=12ms;;; disk=2GB'")))
    assert r.ok and r.observation.detail == "OK - 3 users"
    assert (r.observation.value, r.observation.unit) == (0.0, "exit_code")
    assert r.observation.values == (("users", 3.0, ""), ("time", 0.012, "seconds"), ("disk", 2 * 1024**3, "bytes"))


async def test_output_is_capped() -> None:
    """Output beyond 64 KiB is read and thrown away, so a chatty command finishes and memory stays bounded."""
    code = "import sys; print('first line'); sys.stdout.write('x' * 1_000_000)"
    r = await sample(check(type="exec", command=[sys.executable, "-c", code]))
    assert r.ok, r.reason
    dropped = len("first line\n") + 1_000_000 - 64 * 1024
    assert r.observation.detail == f"first line (output cut at 64 KiB, {dropped} more bytes dropped)"


DUMP = "import json, os, sys; open(sys.argv[1], 'w').write(json.dumps({'env': dict(os.environ), 'cwd': os.getcwd()}))"


async def test_environment_allow_list_and_cwd(tmp_path: Path, monkeypatch) -> None:
    """The command sees only PATH, LANG, TZ and its `env` table, in cwd "/" unless told otherwise."""
    monkeypatch.setenv("LANG", "C.UTF-8")
    monkeypatch.setenv("TZ", "UTC")
    monkeypatch.setenv("HEALTHGATE_TEST_LEAK", "must not pass")
    out = tmp_path / "seen.json"
    r = await sample(check(type="exec", command=[sys.executable, "-c", DUMP, str(out)], env={"TOKEN": "s3cret"}))
    assert r.ok, r.reason
    seen = json.loads(out.read_text())
    assert seen["env"] == {"PATH": os.environ["PATH"], "LANG": "C.UTF-8", "TZ": "UTC", "TOKEN": "s3cret"}
    assert seen["cwd"] == "/"

    r = await sample(check(type="exec", command=[sys.executable, "-c", DUMP, str(out)],
                           pass_env=["HEALTHGATE_TEST_LEAK", "LANG"], cwd=str(tmp_path)))
    assert r.ok, r.reason
    seen = json.loads(out.read_text())
    # pass_env replaces the default list: no PATH, no TZ now.
    assert seen["env"] == {"HEALTHGATE_TEST_LEAK": "must not pass", "LANG": "C.UTF-8"}
    assert seen["cwd"] == str(tmp_path)


def test_env_values_are_secrets() -> None:
    """Values of an exec check's `env` table are secrets of the whole config, masked wherever it speaks."""
    cfg = parse_config({"checks": [{"name": "x", "type": "exec", "command": ["true"],
                                    "env": {"PGPASSWORD": "hunter2", "EMPTY": ""}}]})
    assert "hunter2" in cfg.secrets() and "" not in cfg.secrets()


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping to another user needs root")
async def test_runs_as_user() -> None:
    """With `user`, the command runs with that user's uid and groups."""
    r = await sample(check(type="exec", command=["id"], user="nobody"))
    assert r.ok, r.reason
    assert r.observation.detail.startswith("uid=65534(nobody) gid=65534(")
    r = await sample(check(type="exec", command=["id"], user="healthgate-no-such-user"))
    assert (r.ok, r.reason) == (False, "exec: no user 'healthgate-no-such-user' on this host")


def test_validate_warns_about_what_this_host_lacks(tmp_path: Path) -> None:
    """`healthgate validate` accepts a config whose command is missing here, and warns about it."""
    f = tmp_path / "c.toml"
    f.write_text('[[checks]]\nname = "plugin"\ntype = "exec"\ncommand = ["/opt/healthgate-no-such/check"]\n')
    proc = cli("validate", "-c", str(f))
    assert proc.returncode == 0
    assert (f"{f}: warning: checks[0] (plugin): command: '/opt/healthgate-no-such/check' is not an executable "
            "on this host's PATH") in proc.stderr


def test_group_kill_under_uvloop(tmp_path: Path) -> None:
    """Under uvloop (the agent's loop when installed) the timeout also kills the whole group."""
    uvloop = pytest.importorskip("uvloop")
    grandchild = tmp_path / "grandchild.pid"
    cfg = check(**sh(f"sleep 300 & echo $! > {grandchild}; echo 'OK'; wait"), timeout=0.3, interval=1)

    async def main() -> None:
        runner = Runner(Context())
        r = await runner.run(cfg)
        assert (r.ok, r.kind) == (False, "timeout")
        pid = int(grandchild.read_text())

        async def gone() -> bool:
            return not runner.hung and not alive(pid)

        await async_wait_for(gone, timeout=5, what=f"grandchild {pid} to be killed")
        ok = await runner.run(check(**sh("echo 'OK - fine'")))
        assert ok.ok and ok.observation.detail == "OK - fine"

    uvloop.run(main())


@pytest.fixture
def record(tmp_path: Path):
    """Where the escapee writes "pid session"; it is killed at teardown should the test fail."""
    path = tmp_path / "grandchild"
    yield path
    if written(path):
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(path.read_text().split()[0]), signal.SIGKILL)


def escapee(record: Path) -> str:
    """Shell that starts a grandchild in a session of its own (setsid), orphaned at once by a subshell
    that exits, which writes "pid session" to `record` and then sleeps for a minute; and waits for that."""
    grandchild = f"read -r _ _ _ _ _ sid _ < /proc/self/stat; echo $$ $sid > {record}; exec sleep 60"
    return (f"(setsid sh -c '{grandchild}' </dev/null >/dev/null 2>&1 &)\n"
            f"while [ ! -s {record} ]; do sleep 0.01; done\n")


def escaped(record: Path) -> int:
    pid, sid = map(int, record.read_text().split())
    assert pid == sid  # it really left the command's session and process group
    return pid


@pytest.mark.parametrize("end, ok, kind", [("exit 0", True, "ok"), ("exit 2", False, "critical"),
                                           ("sleep 300", False, "timeout")])
async def test_a_grandchild_in_its_own_session_dies_with_the_sample(record: Path, end: str, ok: bool,
                                                                    kind: str) -> None:
    """A grandchild that called setsid is gone (killed and reaped) soon after the sample ends, whether the
    command passed, failed or timed out."""
    runner = Runner(Context())
    r = await runner.run(check(**sh(escapee(record) + end), timeout=0.5, interval=1))
    assert (r.ok, r.kind) == (ok, kind), r
    pid = escaped(record)

    async def gone() -> bool:
        return not runner.hung and not reapable(pid)

    await async_wait_for(gone, timeout=5, what=f"grandchild {pid} to be killed and reaped")


async def test_without_children_lists_the_host_wide_walk_finds_the_grandchild(record: Path, monkeypatch) -> None:
    """On a kernel without /proc/PID/task/TID/children, a grandchild in its own session is found and killed
    by walking every process instead."""
    from agent.probes import exec as exec_probe

    monkeypatch.setattr(exec_probe, "_children", lambda pid: None)
    r = await sample(check(**sh(escapee(record) + "echo 'OK'")))
    assert r.ok, r
    pid = escaped(record)
    await async_wait_for(lambda: _gone(pid), timeout=5, what=f"escapee {pid}")


async def test_a_running_sample_keeps_its_escapee_while_another_ends(record: Path) -> None:
    """The end of one exec sample does not kill what another, still running, left in its own session."""
    slow = sh(escapee(record) + f"sleep 0.5; read -r pid _ < {record}; kill -0 $pid && echo 'OK - still here'",
              name="slow", timeout=3, interval=5)
    runner = Runner(Context())
    first = asyncio.create_task(runner.run(check(**slow)))
    await async_wait_for(lambda: _written(record), timeout=5, what="the escapee")
    quick = await runner.run(check(**sh("echo 'OK'"), name="quick"))
    r = await first
    assert quick.ok and r.ok and r.observation.detail == "OK - still here", r
    pid = escaped(record)
    await async_wait_for(lambda: _gone(pid), timeout=5, what=f"escapee {pid} to go with its own sample")


async def test_asyncio_subprocesses_keep_their_exit_status(record: Path) -> None:
    """With the agent adopting orphans, an asyncio subprocess that ends during an exec sample is still
    reaped by asyncio with its own exit status."""
    runner = Runner(Context())
    sample_task = asyncio.create_task(runner.run(check(**sh(escapee(record) + "sleep 0.3"), interval=5)))
    child = await asyncio.create_subprocess_exec("sh", "-c", "exit 7")
    assert await asyncio.wait_for(child.wait(), timeout=5) == 7
    assert (await sample_task).ok
    pid = escaped(record)
    await async_wait_for(lambda: _gone(pid), timeout=5, what=f"escapee {pid}")


def written(path: Path) -> bool:
    return path.exists() and len(path.read_text().split()) == 2


async def _written(path: Path) -> bool:
    return written(path)


async def _gone(pid: int) -> bool:
    return not reapable(pid)


def test_setsid_grandchild_killed_under_uvloop(record: Path) -> None:
    """Under uvloop too, a grandchild in its own session is killed and reaped when the sample ends."""
    uvloop = pytest.importorskip("uvloop")

    async def main() -> None:
        r = await Runner(Context()).run(check(**sh(escapee(record) + "echo 'OK'")))
        assert r.ok, r
        pid = escaped(record)
        await async_wait_for(lambda: _gone(pid), timeout=5, what=f"escapee {pid}")

    uvloop.run(main())

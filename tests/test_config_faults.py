"""Broken config files: `run` refuses each with exit 2 and the key path; SIGHUP with each keeps the old
config serving; as root, a config or token file that others can change is refused (StrictModes)."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.cli import main as cli
from agent.trust import untrusted
from tests.helpers import (
    ROOT,
    AgentProcess,
    agent_toml,
    free_port,
    memory_check,
    require,
    run_argv,
    scrape,
    toml_table,
    wait_for,
)
from tests.test_config import INVALID, expected


def good(tmp: Path, **server: object) -> str:
    return agent_toml(server, state_dir=str(tmp)) + memory_check()

ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="StrictModes applies to an agent running as root")


def run(path: Path, wrapper: tuple[str, ...] = ()) -> subprocess.Popen:
    return subprocess.Popen([*wrapper, *run_argv(path)], cwd=ROOT,
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finished(proc: subprocess.Popen) -> tuple[int, str]:
    out, err = proc.communicate(timeout=60)
    return proc.returncode, out + err


@pytest.fixture(scope="module")
def unprivileged() -> tuple[str, ...]:
    """A command prefix under which file permissions apply: root bypasses them through CAP_DAC_OVERRIDE
    and CAP_DAC_READ_SEARCH, so as root the agent runs with both dropped from its bounding set."""
    if os.geteuid() != 0:
        return ()
    return (require("setpriv", "util-linux"), "--bounding-set=-dac_override,-dac_read_search", "--")


def test_run_refuses_every_broken_file_with_its_key_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`healthgate run` with each file of the broken corpus exits 2 with the key path, never a traceback:
    in-process through the console script's entry point for the whole corpus (an interpreter per file cost
    half a minute), and as a real process for a few of them, whose exit status and output are the same."""
    for src in INVALID:
        dst = tmp_path / src.name
        shutil.copy(src, dst)  # a private copy: the checkout's ownership must not matter here
        assert cli.main(["run", "-c", str(dst)]) == 2, src.name
        out = capsys.readouterr()
        assert expected(src) in out.err, (src.name, out.err)
        assert "Traceback" not in out.err + out.out
    for src in INVALID[:: max(1, len(INVALID) // 3)]:
        code, output = finished(run(tmp_path / src.name))
        assert code == 2, (src.name, output)
        assert expected(src) in output, (src.name, output)
        assert "Traceback" not in output


BROKEN: dict[str, tuple[Callable[[Path], None], str]] = {
    "missing": (lambda p: p.unlink(), "(file): no such file"),
    "directory": (lambda p: (p.unlink(), p.mkdir()), "(file): is a directory"),
    "binary": (lambda p: p.write_bytes(b"\xff\xfe\x00junk"), "(file): not UTF-8 text"),
    "unreadable": (lambda p: p.chmod(0), "(file): cannot read: Permission denied"),
}


@pytest.mark.parametrize("problem", list(BROKEN))
def test_run_refuses_unusable_files(tmp_path: Path, unprivileged: tuple[str, ...], problem: str) -> None:
    """A missing, unreadable, binary or directory config file makes `run` exit 2 saying so."""
    path = tmp_path / "c.toml"
    path.write_text(good(tmp_path))
    breaking, message = BROKEN[problem]
    breaking(path)
    code, output = finished(run(path, unprivileged))
    assert code == 2 and message in output, output
    assert "Traceback" not in output


def reload_errors(agent: AgentProcess) -> list[list[str]]:
    out = []
    for line in agent.logs().splitlines():
        if line.startswith("{") and '"reload_failed"' in line:
            out.append(json.loads(line)["errors"])
    return out


def test_sighup_with_each_broken_file_keeps_the_old_config(tmp_path: Path, unprivileged: tuple[str, ...]) -> None:
    """One agent, SIGHUP after each broken file in turn: every reload is refused with its reason, /health
    stays 200 on the old checks, and a good file afterwards still reloads."""
    agent = AgentProcess(tmp_path, good(tmp_path), wrapper=unprivileged).start()
    pid = agent.proc.pid
    try:
        wait_for(lambda: agent.get("/health")[0] == 200, what="up")
        original = agent.path.read_text()
        cases = [(f.name, lambda p, f=f: p.write_text(f.read_text()), expected(f)) for f in INVALID]
        cases += [(name, breaking, message) for name, (breaking, message) in BROKEN.items()]
        for n, (name, breaking, message) in enumerate(cases, start=1):
            if agent.path.is_dir():
                agent.path.rmdir()
            if not agent.path.exists():
                agent.path.write_text(original)
            agent.path.chmod(0o644)
            breaking(agent.path)
            agent.signal(signal.SIGHUP)
            wait_for(lambda n=n: scrape(agent.url).get("healthgate_config_reload_failures_total") == n,
                     timeout=5, what=f"reload of {name} refused")
            assert agent.get("/health")[0] == 200, name
            assert any(line.startswith(message) for line in reload_errors(agent)[-1]), (name, reload_errors(agent)[-1])
        status = json.loads(agent.get("/status")[1])
        assert list(status["checks"]) == ["mem:memory"]
        if agent.path.is_dir():
            agent.path.rmdir()
        agent.path.write_text(original.replace('name = "mem"', 'name = "mem2"'))
        agent.path.chmod(0o644)
        agent.signal(signal.SIGHUP)
        wait_for(lambda: scrape(agent.url).get("healthgate_config_reloads_total") == 1, timeout=5, what="good reload")
        assert list(json.loads(agent.get("/status")[1])["checks"]) == ["mem2:memory"]
        assert agent.proc.pid == pid and agent.proc.poll() is None
        assert "Traceback" not in agent.logs()
    finally:
        agent.stop()


def test_sighup_with_an_empty_file_keeps_a_down_node_down(tmp_path: Path) -> None:
    """A config truncated to nothing and reloaded is refused: a node DOWN for a failing check stays DOWN,
    rather than turning UP with nothing checked."""
    closed = free_port()
    agent = AgentProcess(tmp_path, good(tmp_path) + toml_table(
        "[[checks]]", name="db", type="tcp", port=closed, interval="200ms", timeout="100ms")).start()
    try:
        wait_for(lambda: "db:tcp" in agent.get("/status")[1], what="the agent serves its checks")
        assert agent.get("/health")[0] == 503
        agent.path.write_text("")
        agent.signal(signal.SIGHUP)
        wait_for(lambda: scrape(agent.url).get("healthgate_config_reload_failures_total") == 1, timeout=5,
                 what="the empty file refused")
        assert reload_errors(agent)[-1] == ["checks: no checks: at least one critical check is required, "
                                            "or the node would be UP with nothing checked"]
        assert agent.get("/health")[0] == 503
        assert list(json.loads(agent.get("/status")[1])["checks"]) == ["mem:memory", "db:tcp"]
    finally:
        agent.stop()


# -- StrictModes ----------------------------------------------------------------------------------------

@ROOT_ONLY
@pytest.mark.parametrize("mode, owner, words", [
    (0o664, "root", "is group-writable (mode 0664"),
    (0o646, "root", "is world-writable (mode 0646"),
    (0o666, "root", "is group- and world-writable (mode 0666"),
    (0o644, "nobody", "is owned by uid 65534 (nobody), not root"),
])
def test_untrusted_files(tmp_path: Path, mode: int, owner: str, words: str) -> None:
    """A file root would read is untrusted when group or others can write it or another user owns it."""
    f = tmp_path / "c.toml"
    f.write_text("")
    f.chmod(mode)
    os.chown(f, pwd.getpwnam(owner).pw_uid, 0)
    problem = untrusted(f)
    assert problem is not None and problem.startswith(str(f)) and words in problem, problem


@ROOT_ONLY
def test_untrusted_directories_and_symlinks(tmp_path: Path) -> None:
    """A writable directory above the file (as written or resolved) makes it untrusted; a sticky one does not."""
    ok = tmp_path / "ok"
    ok.mkdir(mode=0o755)
    (ok / "c.toml").write_text("")
    assert untrusted(ok / "c.toml") is None
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    (sticky / "c.toml").write_text("")
    assert untrusted(sticky / "c.toml") is None
    loose = tmp_path / "loose"
    loose.mkdir()
    loose.chmod(0o775)
    (loose / "c.toml").write_text("")
    assert f"{loose} is group-writable (mode 0775" in untrusted(loose / "c.toml")
    (loose / "link.toml").symlink_to(ok / "c.toml")  # the link lives where others can replace it
    assert f"{loose} is group-writable" in untrusted(loose / "link.toml")
    (ok / "out.toml").symlink_to(loose / "c.toml")  # the target lives where others can replace it
    assert f"{loose} is group-writable" in untrusted(ok / "out.toml")


@ROOT_ONLY
def test_run_as_root_refuses_a_config_others_can_write(tmp_path: Path) -> None:
    """As root, `run` refuses a group-writable config file, naming the file and its mode, exit 2."""
    f = tmp_path / "c.toml"
    f.write_text(good(tmp_path))
    f.chmod(0o664)
    code, output = finished(run(f))
    assert code == 2 and "Traceback" not in output
    assert f"{f}: (file): refusing a file others can change while running as root: {f} is group-writable " \
           f"(mode 0664; fix: chmod go-w {f})" in output, output


@ROOT_ONLY
def test_run_as_root_refuses_a_token_file_others_can_write(tmp_path: Path) -> None:
    """As root, a status token file that another user owns is refused, naming its key."""
    token = tmp_path / "token"
    token.write_text("s3cret-token\n")
    os.chown(token, pwd.getpwnam("nobody").pw_uid, 0)
    f = tmp_path / "c.toml"
    f.write_text(good(tmp_path, status_token_file=str(token)).replace("{port}", "0"))
    code, output = finished(run(f))
    assert code == 2 and "server.status_token_file: refusing a file others can change" in output, output
    assert "s3cret-token" not in output


@ROOT_ONLY
def test_sighup_as_root_refuses_a_config_made_writable(tmp_path: Path) -> None:
    """A config file that became group-writable is refused on SIGHUP; the old config keeps serving."""
    agent = AgentProcess(tmp_path, good(tmp_path)).start()
    try:
        wait_for(lambda: agent.get("/health")[0] == 200, what="up")
        agent.path.chmod(0o664)
        agent.signal(signal.SIGHUP)
        wait_for(lambda: scrape(agent.url).get("healthgate_config_reload_failures_total") == 1, timeout=5)
        assert "is group-writable (mode 0664" in reload_errors(agent)[-1][0]
        assert agent.get("/health")[0] == 200
    finally:
        agent.stop()

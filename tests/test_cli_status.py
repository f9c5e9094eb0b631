"""`healthgate status`, `explain` and `check` as an operator runs them, against a running agent."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from agent.cli import remote, render
from agent.text import tidy
from tests.helpers import PASSING, ROOT, agent_toml, free_port, toml_table, wait_for

CONFIG = agent_toml() + """
[[checks]]
name = "mem"
type = "memory"
interval = "200ms"
timeout = "150ms"
rise = 1
fall = 1
max_used_percent = 100
[[checks]]
name = "db"
type = "tcp"
port = %d
interval = "200ms"
timeout = "150ms"
rise = 1
fall = 1
"""


# The commands' own state directory, empty: a command run here must never find the admin socket of an agent
# the user running the suite has (it would answer for that agent instead of the test's).
NO_STATE = tempfile.mkdtemp(prefix="healthgate-cli-state-")


def healthgate(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = env or {**{k: v for k, v in os.environ.items() if k != "STATE_DIRECTORY"}, "XDG_STATE_HOME": NO_STATE}
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=30, env=env)


def checks_of(agent) -> dict:
    return json.loads(agent.get("/status")[1]).get("checks", {})


def test_status_and_explain_follow_the_agent(agent_process) -> None:
    """status and explain say DOWN with the failing check's reason (exit 2), then UP (exit 0) once it recovers."""
    db_port = free_port()
    agent = agent_process(CONFIG % db_port)
    wait_for(lambda: all("time" in c[0] for c in checks_of(agent).values()) and len(checks_of(agent)) == 2,
             what="both checks sampled")

    down = healthgate("status", "-c", str(agent.path), "--wide")  # the URL comes from the config's server.listen
    assert down.returncode == 2, down.stderr
    lines = down.stdout.splitlines()
    assert lines[0].startswith("DOWN  ") and lines[1] == f"db: tcp 127.0.0.1:{db_port}: connection refused"
    assert lines[3].split() == ["CHECK", "TYPE", "CRIT", "STATUS", "VALUE", "THRESHOLD", "LATENCY", "OK/FAIL",
                                "CHANGED", "HISTORY", "REASON"]
    rows = {line.split()[0]: line for line in lines[4:6]}
    assert rows["mem"].split()[3] == "UP" and "used <= 100%" in rows["mem"]
    assert rows["db"].split()[3] == "DOWN" and rows["db"].endswith(f"tcp 127.0.0.1:{db_port}: connection refused")
    assert "RECENT TRANSITIONS (UTC, newest first)" in down.stdout
    assert "\033[" not in down.stdout  # not a terminal: no colour
    for entry in checks_of(agent).values():  # JSON numbers carry no float noise
        assert entry[0]["durationSeconds"] == float(f"{entry[0]['durationSeconds']:.6g}")
        assert "observedValue" not in entry[0] or entry[0]["observedValue"] == tidy(entry[0]["observedValue"])

    why = healthgate("explain", "--url", agent.url)
    assert why.returncode == 2
    assert "is DOWN since" in why.stdout and "because 1 critical check fails: db (tcp): tcp 127.0.0.1:" in why.stdout
    assert why.stdout.count("\n") == 1  # one paragraph

    with socket.create_server(("127.0.0.1", db_port)) as listener:
        listener.listen(64)
        wait_for(lambda: agent.get("/health")[0] == 200, what="db recovered")
        up = healthgate("status", "--url", agent.url + "/", "-n", "3", "--color", "always")
        assert up.returncode == 0
        assert up.stdout.startswith(render.BOLD + render.GREEN + "UP")
        assert "down" in up.stdout.split("RECENT TRANSITIONS")[1] and "-> " in up.stdout
        nxt = healthgate("explain", "--url", agent.url)
        assert nxt.returncode == 0
        assert "is UP since" in nxt.stdout and "Closest to its threshold: mem (memory) at " in nxt.stdout


def test_status_unreachable_exits_3(tmp_path: Path) -> None:
    """With no agent listening, status and explain say "agent unreachable" and exit 3."""
    url = f"http://127.0.0.1:{free_port()}"
    for cmd in ("status", "explain"):
        out = healthgate(cmd, "--url", url, "--timeout", "2")
        assert out.returncode == 3 and "agent unreachable" in out.stderr and out.stdout == ""


def test_status_with_a_bad_config_exits_3(tmp_path: Path) -> None:
    """An unusable config (needed for the URL) is reported with its key path, exit 3."""
    bad = tmp_path / "bad.toml"
    bad.write_text('[server]\nlisten = "nope"\n')
    out = healthgate("status", "-c", str(bad))
    assert out.returncode == 3 and "server.listen" in out.stderr


@contextlib.asynccontextmanager
async def withholding_agent() -> AsyncIterator[int]:
    """An HTTP server on a free loopback port that answers /status as an agent withholding details does."""
    async def bare(request: web.Request) -> web.Response:
        return web.json_response({"status": "pass"})

    app = web.Application()
    app.router.add_get("/status", bare)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield site._server.sockets[0].getsockname()[1]
    finally:
        await runner.cleanup()


async def test_details_withheld_exit_3() -> None:
    """An agent that withholds details (no token) makes status exit 3 with a hint about --token-file."""
    async with withholding_agent() as port:
        code = await asyncio.to_thread(remote.run_status, f"http://127.0.0.1:{port}", None, 2.0, False, 0)
    assert code == remote.EXIT_UNKNOWN


@pytest.mark.parametrize("listen, url", [
    ("0.0.0.0:8080", "http://127.0.0.1:8080"), ("[::]:9000", "http://[::1]:9000"),
    ("10.1.2.3:81", "http://10.1.2.3:81"), (":8080", "http://127.0.0.1:8080"),
])
def test_default_url_from_listen(listen: str, url: str) -> None:
    """The default URL is the config's server.listen, with a wildcard host turned into loopback."""
    from agent.config import parse_config

    assert remote.default_url(parse_config({"server": {"listen": listen}, "checks": [PASSING]})) == url


def test_check_prints_the_same_columns_as_status(tmp_path: Path) -> None:
    """`healthgate check` prints the status page's rows: the same header as `status`, one row per check."""
    port = free_port()
    cfg = tmp_path / "c.toml"
    cfg.write_text((CONFIG % port).replace("{port}", str(free_port())))
    out = healthgate("check", "-c", str(cfg), "--wide")
    assert out.returncode == 2
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["CHECK", "TYPE", "CRIT", "STATUS", "VALUE", "THRESHOLD", "LATENCY", "OK/FAIL",
                                "CHANGED", "HISTORY", "REASON"]
    assert lines[1].split()[:4] == ["mem", "memory", "yes", "UP"] and "used <= 100%" in lines[1]
    assert lines[2].split()[:4] == ["db", "tcp", "yes", "DOWN"]
    assert lines[2].endswith(f"tcp 127.0.0.1:{port}: connection refused")
    assert "CRITICAL: node would be DOWN (db)" in out.stdout
    coloured = healthgate("check", "-c", str(cfg), "--color", "always")
    assert "\033[32mUP" in coloured.stdout and "\033[31mDOWN" in coloured.stdout
    narrow = healthgate("check", "-c", str(cfg), env={**os.environ, "COLUMNS": "60"})
    table = narrow.stdout.split("\n\n")[0].splitlines()
    assert all(len(line) <= 60 for line in table), table  # the terminal's width, from $COLUMNS here


ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="the root rule applies as root")


@ROOT_ONLY
@pytest.mark.parametrize("command", ["run", "check"])
def test_root_is_refused_before_any_complaint_about_the_file(tmp_path: Path, command: str) -> None:
    """As root, run and check with a config that does not allow root say so first and only, with the command
    that works, even when the file is also one others can change (which is refused once root is allowed)."""
    path = tmp_path / "c.toml"
    path.write_text("[server]\nlisten = \"127.0.0.1:0\"\n" + toml_table("[[checks]]", **PASSING))
    path.chmod(0o666)
    env = {k: v for k, v in os.environ.items() if k != "SUDO_USER"}
    proc = healthgate(command, "-c", str(path), env=env)
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and "agent.allow_root: refusing to run as root" in lines[0], proc.stderr
    assert f"`sudo -u USER {sys.executable} -m agent {command} -c {path}`" in lines[0]
    assert f"add `allow_root = true` under [agent] in {path}" in lines[0]
    os.chown(path, 65534, -1)  # a file of an ordinary user: the command names that user
    owner = pwd.getpwuid(65534).pw_name
    assert f"`sudo -u {owner} {sys.executable} -m agent {command} -c {path}`" in healthgate(
        command, "-c", str(path), env=env).stderr
    os.chown(path, 0, -1)
    path.write_text("[agent]\nallow_root = true\n" + path.read_text())
    proc = healthgate(command, "-c", str(path))
    assert proc.returncode == 2 and "refusing a file others can change while running as root" in proc.stderr


def test_a_closed_pipe_ends_every_command_quietly(tmp_path: Path) -> None:
    """`healthgate schema | head -1` and any command whose reader has gone exit 0 or 141 (as a tool killed
    by SIGPIPE does) with nothing on stderr: no traceback, no "Exception ignored"."""
    config = tmp_path / "c.toml"
    config.write_text(agent_toml().replace("{port}", "0") + toml_table("[[checks]]", **PASSING))
    for args in (["schema"], ["validate", "-c", str(config)], ["check", "-c", str(config), "--color", "never"],
                 ["--help"], ["--version"]):
        proc = subprocess.Popen([sys.executable, "-m", "agent", *args], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        proc.stdout.close()  # long before the interpreter has started: every write meets a closed pipe
        _, err = proc.communicate(timeout=30)
        assert proc.returncode in (0, 141) and err == b"", (args, proc.returncode, err.decode())
    head = subprocess.run(f"{sys.executable} -m agent schema | head -1", shell=True, cwd=ROOT, capture_output=True,
                          text=True, timeout=30)
    assert head.stdout == "{\n" and head.stderr == ""


@pytest.mark.parametrize("given, url", [
    ("127.0.0.1:8080", "http://127.0.0.1:8080"), ("[::1]:8080", "http://[::1]:8080"),
    ("localhost:8080", "http://localhost:8080"), ("https://node:8443", "https://node:8443"),
    ("http://10.0.0.1:8080/", "http://10.0.0.1:8080/"),
])
def test_url_without_a_scheme_means_http(given: str, url: str) -> None:
    """--url 127.0.0.1:8080 is http://127.0.0.1:8080; a URL with its scheme is kept as written."""
    assert remote.agent_url(given) == url


async def test_status_reaches_an_agent_given_without_a_scheme() -> None:
    """`status --url 127.0.0.1:PORT` asks the agent there over HTTP (here one that withholds details)."""
    async with withholding_agent() as port:
        out = await asyncio.to_thread(healthgate, "status", "--url", f"127.0.0.1:{port}", "--timeout", "5")
    assert out.returncode == 3 and out.stderr.startswith(f"NOT AUTHORIZED  http://127.0.0.1:{port}\n"), out.stderr

"""The agent as a real process: drain on SIGTERM, reload on SIGHUP, the README's run command, `check`."""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT, AgentProcess, free_port, http_get, loop_in_use, run_argv, wait_for

BASE = """
[server]
listen = "127.0.0.1:{port}"
shutdown_drain = "%s"
trusted_networks = ["127.0.0.1/32"]
[agent]
allow_root = true
"""

MEM = """
[[checks]]
name = "%s"
type = "memory"
interval = "200ms"
timeout = "100ms"
rise = 1
max_used_percent = 100
"""


def test_sigterm_drains_then_exits_zero(agent_process) -> None:
    """SIGTERM turns /health 503 at once, keeps answering for shutdown_drain, then exits 0."""
    agent = agent_process(BASE % "1500ms" + MEM % "mem")
    wait_for(lambda: agent.get("/health")[0] == 200, what="up")
    agent.signal(signal.SIGTERM)
    t0 = time.monotonic()
    wait_for(lambda: agent.get("/health")[0] == 503, timeout=1, what="503 during drain")
    seen = []
    while agent.proc.poll() is None and time.monotonic() - t0 < 5:
        try:
            seen.append(agent.get("/health", timeout=0.5)[0])
        except OSError:
            break
        time.sleep(0.05)
    assert agent.proc.wait(5) == 0
    elapsed = time.monotonic() - t0
    assert set(seen) == {503} and len(seen) > 10
    assert 1.4 <= elapsed < 4, elapsed
    assert '"event": "draining"' in agent.logs()


def test_sigint_with_zero_drain_exits_at_once(agent_process) -> None:
    """shutdown_drain = 0 exits right after the signal, with status 0."""
    agent = agent_process(BASE % "0s" + MEM % "mem")
    agent.signal(signal.SIGINT)
    assert agent.proc.wait(3) == 0


def test_sighup_with_broken_file_keeps_old_config(agent_process) -> None:
    """A reload with a bad file keeps the old checks serving and counts the failure."""
    agent = agent_process(BASE % "0s" + MEM % "mem")
    wait_for(lambda: agent.get("/health")[0] == 200, what="up")
    agent.path.write_text(agent.path.read_text() + '\n[[checks]]\nname = "x"\ntype = "bogus"\n')
    agent.signal(signal.SIGHUP)
    wait_for(lambda: "healthgate_config_reload_failures_total 1.0" in agent.get("/metrics")[1], what="counted")
    assert agent.get("/health")[0] == 200
    status = json.loads(agent.get("/status")[1])
    assert list(status["checks"]) == ["mem:memory"]
    log = agent.logs()
    assert '"event": "reload_failed"' in log and "checks[1] (x).type: unknown check type 'bogus'" in log


def test_sighup_swaps_checks_and_keeps_unchanged_state(agent_process) -> None:
    """A good reload adds and removes checks without a restart; an unchanged check keeps its state."""
    agent = agent_process(BASE % "0s" + MEM % "keep" + MEM % "gone")
    wait_for(lambda: agent.get("/health")[0] == 200, what="up")
    before = json.loads(agent.get("/status")[1])["checks"]["keep:memory"][0]["lastTransition"]
    port = free_port()
    agent.path.write_text(BASE.replace("{port}", str(agent.port)) % "0s" + MEM % "keep" + f"""
[[checks]]
name = "new"
type = "tcp"
port = {port}
interval = "200ms"
timeout = "100ms"
""")
    agent.signal(signal.SIGHUP)
    wait_for(lambda: agent.get("/health")[0] == 503, what="the new failing check takes the node down")
    wait_for(lambda: "output" in json.loads(agent.get("/status")[1])["checks"]["new:tcp"][0]
             and "refused" in json.loads(agent.get("/status")[1])["checks"]["new:tcp"][0]["output"],
             what="the new check's first result")
    checks = json.loads(agent.get("/status")[1])["checks"]
    assert sorted(checks) == ["keep:memory", "new:tcp"]
    assert checks["keep:memory"][0]["lastTransition"] == before
    assert checks["new:tcp"][0]["output"] == f"tcp 127.0.0.1:{port}: connection refused"
    assert agent.proc.poll() is None


def test_run_with_bad_config_exits_2_without_traceback(tmp_path: Path) -> None:
    """`healthgate run` with a bad file exits 2 with the key path."""
    f = tmp_path / "c.toml"
    f.write_text('[[checks]]\nname = "a"\ntype = "tcp"\nport = 1\ninterval = "1s"\ntimeout = "5s"\n')
    proc = subprocess.run(run_argv(f), capture_output=True, text=True,
                          cwd=ROOT, timeout=30)
    assert proc.returncode == 2
    assert "checks[0] (a).timeout: must be shorter than interval (1s)" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_run_refuses_port_in_use(tmp_path: Path) -> None:
    """A listen address already taken is a clear error naming server.listen, exit 2."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        f = tmp_path / "c.toml"
        f.write_text((BASE % "0s" + MEM % "mem").replace("{port}", str(port)))
        proc = subprocess.run(run_argv(f), capture_output=True,
                              text=True, cwd=ROOT, timeout=30)
    assert proc.returncode == 2
    assert f"server.listen: cannot listen on 127.0.0.1:{port}" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="the root refusal needs root")
def test_run_refuses_root_without_allow_root(tmp_path: Path) -> None:
    """As root, `run` refuses to start unless agent.allow_root is set."""
    f = tmp_path / "c.toml"
    f.write_text(MEM % "mem")
    proc = subprocess.run(run_argv(f), capture_output=True, text=True,
                          cwd=ROOT, timeout=30)
    assert proc.returncode == 2 and "agent.allow_root: refusing to run as root" in proc.stderr


def test_check_command_exit_codes(tmp_path: Path) -> None:
    """`healthgate check` exits 0 when the node would be up and 2 (CRITICAL) when down, with a table."""
    good = tmp_path / "good.toml"
    good.write_text("[agent]\nallow_root = true\n" + MEM % "mem")  # tests run as root
    bad = tmp_path / "bad.toml"
    bad.write_text("[agent]\nallow_root = true\n" + MEM % "mem" + f'[[checks]]\nname = "db"\ntype = "tcp"\nport = {free_port()}\n')
    ok = subprocess.run([sys.executable, "-m", "agent", "check", "-c", str(good)], capture_output=True, text=True,
                        cwd=ROOT, timeout=30)
    assert ok.returncode == 0 and "OK: node would be UP" in ok.stdout
    assert ok.stdout.splitlines()[0].split()[:4] == ["CHECK", "TYPE", "CRIT", "STATUS"]
    down = subprocess.run([sys.executable, "-m", "agent", "check", "-c", str(bad)], capture_output=True,
                          text=True, cwd=ROOT, timeout=30)
    assert down.returncode == 2 and "CRITICAL: node would be DOWN (db)" in down.stdout
    assert "\033[" not in down.stdout  # no colour when not a terminal


def test_version_and_help() -> None:
    """--version prints the version; --help lists every command."""
    from agent import __version__

    out = subprocess.run([sys.executable, "-m", "agent", "--version"], capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.strip() == f"healthgate {__version__}"
    helptext = subprocess.run([sys.executable, "-m", "agent", "--help"], capture_output=True, text=True,
                              cwd=ROOT).stdout
    for cmd in ("run", "check", "validate", "schema"):
        assert cmd in helptext


def test_readme_run_command_serves_up(tmp_path: Path) -> None:
    """On this checkout, the README's run command (`make run`) brings /health to 200 on an idle machine."""
    readme = (ROOT / "README.md").read_text()
    assert "make run" in readme
    # The default config listens on :8080; run it as written, on another port only if 8080 is taken.
    port = 8080
    try:
        http_get(f"http://127.0.0.1:{port}/health", timeout=0.3)
        port = free_port()
    except OSError:
        pass
    config = (ROOT / "config" / "healthgate.toml").read_text().replace(":8080", f":{port}")
    if os.geteuid() == 0:  # the agent refuses root by default; CI runs as root
        assert "[agent]" not in config
        config += "\n[agent]\nallow_root = true\n"
    cfg = tmp_path / "healthgate.toml"
    cfg.write_text(config)
    make = shutil.which("make")
    if make is None:
        pytest.skip("make not found: apt-get install make")
    # As a user types it: not with the variables of a `make test PY=3.12` this test may run under.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "PY", "VENV")}
    proc = subprocess.Popen([make, "-s", "run", f"CONFIG={cfg}"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True, env=env)
    try:
        # `make run` installs first when its venv is missing or older than pyproject.toml (a fresh clone,
        # or another interpreter's venv under `make ... PY=3.12`): that install may take a minute.
        wait_for(lambda: http_get(f"http://127.0.0.1:{port}/health", timeout=0.5)[0] == 200 or proc.poll(),
                 timeout=150, what="make run -> /health 200")
        assert proc.poll() is None, proc.stdout.read().decode()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(15)


@pytest.mark.parametrize("choice", ["auto", "asyncio", "uvloop"])
def test_run_loop_option(tmp_path: Path, choice: str) -> None:
    """`run --loop auto` serves on uvloop when it is installed and on asyncio without it (a plain
    `pip install .`); `--loop uvloop` without uvloop exits 2 saying so instead of falling back."""
    agent = AgentProcess(tmp_path, BASE % "0s" + MEM % "mem", loop=choice)
    if choice == "uvloop" and importlib.util.find_spec("uvloop") is None:
        agent.start(wait=False)
        assert agent.proc.wait(30) == 2
        assert "--loop uvloop asked for, but uvloop is not installed" in agent.logs()
        return
    try:
        agent.start()
        started = next(json.loads(line) for line in agent.logs().splitlines() if '"event": "started"' in line)
        assert started["loop"] == loop_in_use(choice)
        assert started["python"] == platform.python_version()
    finally:
        agent.stop()

"""A system resolver that never answers: it costs the checks that resolve names, never drain or maintenance."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faulty import SilentDns
from tests.helpers import ROOT, agent_toml, free_port, memory_check, toml_table, wait_for

# Where host-name lookups wait: the default executor's 32 workers under asyncio's loop (agent/app.py); under
# uvloop, libuv's own pool of 4 (UV_THREADPOOL_SIZE). The 33 threads were asyncio's pool plus main.
POOL = {"asyncio": 32, "uvloop": 4}
TAKES_EFFECT = 1.0  # the bound docs/operations.md promises for drain and maintenance, whatever the probes do

# The lookups would hang within the probes' own timeouts anyway; short intervals fill the pool in seconds.
FAST = {"interval": "200ms", "timeout": "100ms", "critical": False, "fall": 1}


def hung_checks() -> str:
    """Every check type that resolves a host name through the system resolver, aimed at names that hang."""
    text = toml_table("[[checks]]", name="api", type="http", url="http://api.hung.test:8080/", **FAST)
    text += toml_table("[[checks]]", name="cache", type="redis", host="cache.hung.test", **FAST)
    text += toml_table("[[checks]]", name="db", type="postgres", host="db.hung.test", **FAST)
    for i in range(3):
        text += toml_table("[[checks]]", name=f"tcp{i}", type="tcp", host=f"svc{i}.hung.test", port=443, **FAST)
    return text


@pytest.fixture
def silent_dns() -> Iterator[SilentDns]:
    if os.geteuid() != 0:
        pytest.skip("a private resolv.conf (unshare --mount, mount --bind) and port 53 need root")
    if shutil.which("unshare") is None:
        pytest.skip("unshare not found: apt-get install util-linux")
    server = SilentDns().start()
    yield server
    server.stop()


def hung_resolver_wrapper(resolv: Path, loop: str) -> tuple[str, ...]:
    """A command prefix: the agent alone, in a mount namespace of its own, sees `resolv` as /etc/resolv.conf
    (and runs on `loop`)."""
    return ("unshare", "--mount", "--propagation", "private", "sh", "-c",
            f'mount --bind "$0" /etc/resolv.conf && exec "$@" --loop {loop}', str(resolv))


def threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "agent", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def takes_effect(agent, command: tuple[str, ...], code: int) -> tuple[float, subprocess.CompletedProcess]:
    """Run a drain/maint/ready command; (seconds from its write of the state file until /health answers
    `code`, the finished command). Counted from the write: the command's own start-up is not the agent's."""
    proc = cli(*command)
    written = proc.stdout.readline()  # the command prints this line right after the state file is in place
    t0 = time.monotonic()
    assert written.startswith(command[0]), (written, proc.communicate(timeout=10))
    wait_for(lambda: agent.get("/health", timeout=0.5)[0] == code, timeout=5, interval=0.01,
             what=f"/health {code} after {' '.join(command)}")
    took = time.monotonic() - t0
    out, err = proc.communicate(timeout=10)
    return took, subprocess.CompletedProcess(proc.args, proc.returncode, written + out, err)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_maintenance_takes_effect_while_the_resolver_hangs(agent_process, silent_dns, tmp_path: Path,
                                                           loop: str) -> None:
    """With the system resolver never answering and every lookup thread stuck, the name-resolving checks fail
    `timeout`, the rest keeps the node up, and maint, drain and ready each change /health within 1 s and
    exit 0, confirmed by the agent."""
    if loop == "uvloop":
        pytest.importorskip("uvloop")
    pool = POOL[loop]
    resolv = tmp_path / "resolv.conf"
    resolv.write_text(silent_dns.resolv_conf())
    config = agent_toml(state_dir=str(tmp_path / "state")) + memory_check()
    config += toml_table("[agent_check]", listen=f"127.0.0.1:{free_port()}")  # its weight sampler runs too
    agent = agent_process(config + hung_checks(), wrapper=hung_resolver_wrapper(resolv, loop))
    pid = agent.proc.pid  # unshare execs sh, which execs the agent: one process
    wait_for(lambda: agent.get("/health")[0] == 200, what="up on the memory check alone")

    # Every worker of the lookup pool is stuck in getaddrinfo: the state the issue reproduced.
    wait_for(lambda: threads(pid) > pool, timeout=20, what=f"more than {pool} threads (the lookup pool full)")
    assert silent_dns.queries > 0  # the agent's lookups really went to the silent server
    print(f"threads with the lookup pool full: {threads(pid)}; queries seen: {silent_dns.queries}")

    cfg = str(agent.path)
    timings = []
    for command, code in ((("maint", "-c", cfg, "--reason", "hung resolver"), 503),
                          (("ready", "-c", cfg), 200),
                          (("drain", "-c", cfg), 503),
                          (("ready", "-c", cfg), 200)):
        took, proc = takes_effect(agent, command, code)
        timings.append(f"{command[0]} {took:.3f}s")
        assert proc.returncode == 0 and proc.stderr == "", (command, proc.stdout, proc.stderr)
        assert took < TAKES_EFFECT, f"{command[0]} took {took:.2f}s to reach /health"
    print("took effect after the write:", ", ".join(timings))

    status = json.loads(agent.get("/status")[1])
    checks = {name.split(":")[0]: entry[0] for name, entry in status["checks"].items()}
    assert checks["mem"]["status"] == "pass"
    for name in ("api", "cache", "db", "tcp0", "tcp1", "tcp2"):
        assert checks[name]["status"] == "fail" and checks[name]["output"].startswith("timeout"), checks[name]
    # What the hang can hold is bounded: the lookup pool, plus at most one thread per purpose of the agent's.
    count = threads(pid)
    print(f"threads at the end: {count}")
    assert count <= pool + 16, count

    # SIGTERM: the stuck lookups are not waited for (they would hold the exit for the resolver's 30 s).
    agent.signal(signal.SIGTERM)
    t0 = time.monotonic()
    assert '"event": "started"' in agent.logs()  # every listener bound although lookups hold the pool
    assert agent.proc.wait(15) == 0
    print(f"exit after SIGTERM: {time.monotonic() - t0:.2f}s")
    assert time.monotonic() - t0 < 5


def test_commands_exit_1_when_the_agent_does_not_answer(agent_process, tmp_path: Path) -> None:
    """A stopped agent accepts connections but never answers: maint writes the file, exits 1 saying the agent
    did not answer, and the agent applies it once it runs again."""
    agent = agent_process(agent_toml(state_dir=str(tmp_path / "state")) + memory_check())
    wait_for(lambda: agent.get("/health")[0] == 200, what="up")
    agent.signal(signal.SIGSTOP)
    try:
        proc = cli("maint", "-c", str(agent.path))
        _, err = proc.communicate(timeout=15)
        assert proc.returncode == 1, err
        sock = tmp_path / "state" / "healthgate.sock"
        assert (f"maint written to {tmp_path / 'state' / 'admin.json'} but not confirmed: the agent did not answer "
                f"at {sock} (the admin socket) within 2s (timed out)") in err, err
        assert "still reports" not in err and "TimeoutError" not in err
    finally:
        agent.signal(signal.SIGCONT)
    wait_for(lambda: agent.get("/health")[0] == 503, timeout=5, what="maint applied after SIGCONT")


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_listen_name_the_resolver_never_answers_is_a_config_error(agent_process, silent_dns, tmp_path: Path,
                                                                    loop: str) -> None:
    """agent_check.listen given as a name the resolver never answers: start fails within the lookup's bound
    with exit 2 and a line that names the key and the cure, instead of hanging before it serves."""
    if loop == "uvloop":
        pytest.importorskip("uvloop")
    resolv = tmp_path / "resolv.conf"
    resolv.write_text(silent_dns.resolv_conf())
    port = free_port()
    config = agent_toml(state_dir=str(tmp_path / "state")) + memory_check()
    config += toml_table("[agent_check]", listen=f"agent.hung.test:{port}")
    agent = agent_process(config, wait=False, wrapper=hung_resolver_wrapper(resolv, loop))
    t0 = time.monotonic()
    assert agent.proc.wait(20) == 2, agent.logs()
    took = time.monotonic() - t0
    assert f"agent_check.listen: cannot listen on agent.hung.test:{port}: resolving 'agent.hung.test' took " \
           "over 5s (an IP address needs no resolver)" in agent.logs(), agent.logs()
    assert "Traceback" not in agent.logs()
    assert took < 15, took

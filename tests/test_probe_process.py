"""process and per-process fds against real processes: running, gone, zombie, stopped, too big, too many fds."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.probes.base import Context
from tests.helpers import wait_for
from tests.probing import PROC, check, sample


def state_of(pid: int) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("State:"):
            return line.split()[1]
    return "?"


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., tuple[subprocess.Popen, Path]]]:
    """Start a real process and write its pidfile; killed and reaped at teardown."""
    procs: list[subprocess.Popen] = []

    def start(argv: list[str], **kw) -> tuple[subprocess.Popen, Path]:
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, **kw)
        procs.append(p)
        pidfile = tmp_path / f"{p.pid}.pid"
        pidfile.write_text(f"{p.pid}\n")
        return p, pidfile

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(5)


def sleeper(marker: str) -> list[str]:
    return ["sleep", f"300.{marker}"]  # a unique command line, so no other test's process matches


async def test_running_then_gone_by_pidfile(spawn) -> None:
    """A live process passes with its RSS and threads; once it exits the stale pidfile fails with its pid."""
    p, pidfile = spawn(sleeper("1"))
    cfg = check(type="process", pidfile=str(pidfile))
    r = await sample(cfg)
    assert r.ok, r.reason
    assert (r.observation.value, r.observation.unit) == (1.0, "count")
    series = {name: value for name, value, _ in r.observation.values}
    assert series["rss"] > 0 and series["threads"] == 1
    p.kill()
    p.wait(5)
    r = await sample(cfg)
    assert (r.ok, r.kind) == (False, "not_running")
    assert r.reason == f"process pidfile {pidfile}: pid {p.pid} from the pidfile is not running (stale pidfile)"


async def test_pidfile_problems(tmp_path: Path, spawn) -> None:
    """A missing pidfile, junk in it, or a pid that is now another program each fail saying which."""
    missing = tmp_path / "none.pid"
    r = await sample(check(type="process", pidfile=str(missing)))
    assert r.reason == f"process pidfile {missing}: pidfile does not exist (not started, or exited cleanly)"
    junk = tmp_path / "junk.pid"
    junk.write_text("hello\n")
    assert (await sample(check(type="process", pidfile=str(junk)))).reason.endswith("pidfile holds no pid ('hello')")
    _, pidfile = spawn(sleeper("2"))
    r = await sample(check(type="process", pidfile=str(pidfile), process_name="nginx"))
    assert r.reason.endswith("from the pidfile is another program (pid reused after a crash?)")


async def test_name_and_cmdline_and_count(tmp_path: Path, spawn) -> None:
    """Processes are found by name (past the kernel's 15-character cut) and cmdline; min_count counts them."""
    marker = str(uuid.uuid4().int)[:9]  # sleep takes only digits after the point
    long_name = tmp_path / "healthgate-test-sleeper"
    long_name.symlink_to("/bin/sleep")
    for _ in range(3):
        spawn([str(long_name), f"300.{marker}"])
    by_name = await sample(check(type="process", process_name="healthgate-test-sleeper", cmdline=marker,
                                 min_count=3))
    assert by_name.ok and by_name.observation.value == 3.0, by_name.reason
    r = await sample(check(type="process", cmdline=rf"sleeper 300\.{marker}$", min_count=4))
    assert (r.ok, r.kind) == (False, "not_running")
    assert r.reason == rf"process /sleeper 300\.{marker}$/: 3 running (need 4)"
    r = await sample(check(type="process", process_name="healthgate-no-such"))
    assert r.reason == "process healthgate-no-such: not running"


async def test_zombie_and_stopped_are_not_running(spawn) -> None:
    """A zombie (exited, not reaped) and a stopped process exist but fail the check."""
    zombie, pidfile = spawn(["true"])
    wait_for(lambda: state_of(zombie.pid) == "Z", timeout=5, what="the child to become a zombie")
    r = await sample(check(type="process", pidfile=str(pidfile)))
    assert (r.ok, r.kind) == (False, "zombie")
    assert r.reason == f"process pidfile {pidfile}: not running; pid {zombie.pid} zombie"

    stopped, pidfile = spawn(sleeper("3"))
    stopped.send_signal(signal.SIGSTOP)
    wait_for(lambda: state_of(stopped.pid) == "T", timeout=5, what="the process to stop")
    r = await sample(check(type="process", pidfile=str(pidfile)))
    assert r.reason == f"process pidfile {pidfile}: not running; pid {stopped.pid} stopped"
    stopped.send_signal(signal.SIGCONT)
    wait_for(lambda: state_of(stopped.pid) != "T", timeout=5, what="the process to continue")
    assert (await sample(check(type="process", pidfile=str(pidfile)))).ok


async def test_rss_and_threads_bounds(spawn) -> None:
    """A process over max_rss or max_threads fails, naming the pid and the number."""
    code = ("import threading, time\n"
            "for _ in range(4): threading.Thread(target=time.sleep, args=(300,), daemon=True).start()\n"
            "print('ready', flush=True); time.sleep(300)\n")
    p, pidfile = spawn([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline() == "ready\n"
    assert (await sample(check(type="process", pidfile=str(pidfile), max_rss="1GiB", max_threads=5))).ok
    r = await sample(check(type="process", pidfile=str(pidfile), max_threads=3))
    assert (r.ok, r.kind, r.reason) == (False, "threads", f"process pidfile {pidfile}: pid {p.pid} has 5 threads > 3")
    r = await sample(check(type="process", pidfile=str(pidfile), max_rss="1MiB"))
    assert (r.ok, r.kind) == (False, "rss")
    assert r.reason.startswith(f"process pidfile {pidfile}: pid {p.pid} rss ") and r.reason.endswith(" > 1.0 MiB")


async def test_process_fds_against_rlimit(spawn) -> None:
    """fds for a real process compares its open fds with its own soft RLIMIT_NOFILE."""
    code = ("import os, resource, time\n"
            "resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))\n"
            "fds = [os.open('/dev/null', os.O_RDONLY) for _ in range(55)]\n"
            "print('ready', flush=True); time.sleep(300)\n")
    p, pidfile = spawn([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline() == "ready\n"
    open_fds = len(os.listdir(f"/proc/{p.pid}/fd"))
    assert open_fds >= 58
    r = await sample(check(type="fds", pidfile=str(pidfile), max_used_percent=80))
    assert (r.ok, r.kind) == (False, "threshold")
    assert r.reason == (f"fds pidfile {pidfile}: pid {p.pid} has {open_fds} of 64 fds open "
                        f"({100 * open_fds / 64:.1f}%) > 80% of RLIMIT_NOFILE")
    assert (await sample(check(type="fds", pidfile=str(pidfile), max_used_percent=99))).ok


@pytest.mark.parametrize("keys, ok, reason", [
    ({"process_name": "app-server", "max_rss": "2GiB", "max_threads": 200}, True, ""),
    ({"process_name": "app-server", "max_rss": "1GiB"}, False,
     "process app-server: pid 4194000 rss 1.5 GiB > 1.0 GiB"),
    ({"cmdline": "--port 8080", "max_threads": 100}, False,
     "process /--port 8080/: pid 4194000 has 120 threads > 100"),
])
async def test_process_thresholds_on_recorded_proc(keys: dict, ok: bool, reason: str) -> None:
    """Bounds apply to the recorded process as they do to a live one."""
    r = await sample(check(type="process", **keys), Context(proc=PROC / "busy"))
    assert (r.ok, r.reason) == (ok, reason)

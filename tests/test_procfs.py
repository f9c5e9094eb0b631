"""System-wide /proc files are read on the loop only when the kernel's procfs serves them: a /proc/meminfo
that is really a FUSE file (lxcfs in a container) or anything else that can hang goes to the check's thread."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from agent.probes.blocking import served_by_procfs
from tests.helpers import agent_toml, memory_check, toml_table, wait_for


def test_the_kernels_proc_files_are_told_from_look_alikes(tmp_path: Path) -> None:
    assert served_by_procfs("/proc/meminfo") and served_by_procfs("/proc/pressure/cpu")
    fake = tmp_path / "meminfo"
    fake.write_text("MemTotal: 1000 kB\n")
    assert not served_by_procfs(str(fake))  # the fixture files tests put in place of /proc
    assert not served_by_procfs(str(tmp_path / "missing"))


def bind_over_meminfo(fifo: Path) -> tuple[str, ...]:
    """A command prefix: the agent alone, in a mount namespace of its own, sees `fifo` (which nobody ever
    writes: a read of it blocks forever, as a hung FUSE server's does) as /proc/meminfo."""
    return ("unshare", "--mount", "--propagation", "private", "sh", "-c",
            'mount --bind "$0" /proc/meminfo && exec "$@"', str(fifo))


def test_a_meminfo_that_hangs_costs_the_memory_check_alone(agent_process, tmp_path: Path) -> None:
    """/proc/meminfo bind-mounted from something that never answers: the memory check fails `timeout` in
    its own thread, the loop never stalls (no loop_stalled, /live 200), and the disk check keeps passing."""
    if os.geteuid() != 0:
        pytest.skip("a private mount namespace (unshare --mount, mount --bind) needs root")
    if shutil.which("unshare") is None:
        pytest.skip("unshare not found: apt-get install util-linux")
    fifo = tmp_path / "meminfo"
    os.mkfifo(fifo)
    config = agent_toml(state_dir=str(tmp_path / "state")) + memory_check("mem", critical=False)
    config += toml_table("[[checks]]", name="disk", type="disk", path=str(tmp_path), interval="200ms",
                         timeout="100ms", rise=1, min_free_percent=0)
    agent = agent_process(config, wrapper=bind_over_meminfo(fifo))
    wait_for(lambda: agent.get("/health")[0] == 200, what="up on the disk check")

    def checks() -> dict:
        status = json.loads(agent.get("/status")[1])
        return {name.split(":")[0]: entry[0] for name, entry in status["checks"].items()}

    # The first sample times out (the journal says so); later ones find the read still stuck in its
    # thread. /status may first answer after that first sample: aiohttp loads for it.
    wait_for(lambda: '"reason": "timeout after' in agent.logs(), what="the memory check timing out")
    wait_for(lambda: checks()["mem"]["output"].startswith(("timeout", "memory: the read started")) and
             checks()["mem"]["status"] == "fail", what="and still failing, its read stuck in its thread")
    for _ in range(20):  # a stalled loop would show within a few of these
        assert agent.get("/live")[0] == 200
        assert checks()["disk"]["status"] == "pass"
    assert "loop_stalled" not in agent.logs()


def test_a_meminfo_on_a_hung_fuse_server_never_stalls_the_loop(agent_process, tmp_path: Path) -> None:
    """/proc/meminfo is a FUSE file whose server never answers (lxcfs hung), so even a stat() of it waits:
    telling it from the kernel's own file must not be done on the loop. The memory check fails in its
    thread; /live keeps answering and the disk check keeps passing."""
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        pytest.skip("a FUSE mount in a private mount namespace needs root and /dev/fuse")
    if shutil.which("unshare") is None:
        pytest.skip("unshare not found: apt-get install util-linux")
    config = agent_toml(state_dir=str(tmp_path / "state")) + memory_check("mem", critical=False)
    config += toml_table("[[checks]]", name="disk", type="disk", path=str(tmp_path), interval="200ms",
                         timeout="100ms", rise=1, min_free_percent=0)
    wrapper = ("unshare", "--mount", "--propagation", "private", sys.executable,
               str(Path(__file__).with_name("hung_fuse.py")), "/proc/meminfo")
    agent = agent_process(config, wrapper=wrapper)
    wait_for(lambda: agent.get("/health")[0] == 200, what="up on the disk check")

    def checks() -> dict:
        status = json.loads(agent.get("/status")[1])
        return {name.split(":")[0]: entry[0] for name, entry in status["checks"].items()}

    wait_for(lambda: checks()["mem"]["status"] == "fail", what="the memory check failing in its thread")
    for _ in range(20):
        assert agent.get("/live")[0] == 200
        assert checks()["disk"]["status"] == "pass"
    assert "loop_stalled" not in agent.logs()

"""Readers of /proc shared by the node probes and the weight: CPU times, load, PSI, processes by pidfile, name, cmdline."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, Field

from agent.fields import AbsolutePath, Regex
from agent.probes.base import CheckFailed

COMM_LEN = 15  # the kernel truncates /proc/PID/comm to TASK_COMM_LEN - 1 characters


@dataclass(frozen=True, slots=True)
class CpuTimes:
    busy: int  # jiffies doing anything but idle and iowait (steal counts as busy: the CPU was not ours)
    total: int
    iowait: int
    steal: int


def read_cpu(proc: Path) -> tuple[CpuTimes, int]:
    """The aggregate CPU times and the number of online CPUs, from /proc/stat."""
    times, cpus = parse_stat((proc / "stat").read_text())
    if times is None or cpus == 0:
        raise CheckFailed(f"cannot parse {proc / 'stat'}", "error")
    return times, cpus


def parse_stat(text: str) -> tuple[CpuTimes | None, int]:
    """/proc/stat's text: its aggregate CPU times (None without a `cpu ` line) and how many CPUs it lists."""
    times: CpuTimes | None = None
    cpus = 0
    for line in text.splitlines():
        if line.startswith("cpu "):
            f = [int(x) for x in line.split()[1:]] + [0] * 10
            user, nice, system, idle, iowait, irq, softirq, steal = f[:8]
            # guest and guest_nice (f[8:10]) are already counted in user and nice: not added again.
            total = user + nice + system + idle + iowait + irq + softirq + steal
            times = CpuTimes(busy=total - idle - iowait, total=total, iowait=iowait, steal=steal)
        elif line.startswith("cpu") and line[3:4].isdigit():
            cpus += 1
    return times, cpus


def parse_loadavg(text: str) -> tuple[float, float, float]:
    """/proc/loadavg's text: the 1-, 5- and 15-minute load averages."""
    fields = text.split()
    return float(fields[0]), float(fields[1]), float(fields[2])


def parse_pressure(text: str) -> dict[str, dict[str, float]]:
    """A /proc/pressure file's text as {"some": {"avg10": ..., "total": ...}, "full": {...}}."""
    out: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        kind, *pairs = line.split()
        out[kind] = {k: float(v) for k, _, v in (p.partition("=") for p in pairs)}
    return out


class ProcessSelector(BaseModel):
    """Keys that pick processes; every key given must match (pidfile AND process_name AND cmdline)."""

    pidfile: AbsolutePath | None = Field(default=None, description="file holding the process's pid")
    process_name: str | None = Field(default=None, min_length=1, description="exact process name (/proc/PID/comm)")
    cmdline: Regex | None = Field(default=None, description="regular expression searched in the command line, "
                                  "arguments joined by spaces (pgrep -f)")

    def selects(self) -> bool:
        return any((self.pidfile, self.process_name, self.cmdline))

    def describe(self) -> str:
        """How reasons name the process: `app`, `/java .*-jar/`, `pidfile /run/x.pid`, `app (pidfile /run/x.pid)`."""
        named = " ".join(p for p in (self.process_name, f"/{self.cmdline}/" if self.cmdline else None) if p)
        if not self.pidfile:
            return named
        return f"{named} (pidfile {self.pidfile})" if named else f"pidfile {self.pidfile}"


@dataclass(frozen=True, slots=True)
class ProcInfo:
    pid: int
    name: str
    state: str  # one letter: R S D Z T t X I
    threads: int
    rss: int  # bytes


def read_status(proc: Path, pid: int) -> ProcInfo | None:
    """/proc/PID/status, or None when the process has gone."""
    try:
        text = (proc / str(pid) / "status").read_text(errors="replace")
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    rss = fields.get("VmRSS", "0 kB").split()
    return ProcInfo(pid=pid, name=fields.get("Name", ""), state=fields.get("State", "?")[:1],
                    threads=int(fields.get("Threads", "0")), rss=int(rss[0]) * 1024 if rss else 0)


def _pid_from_file(path: str) -> int:
    try:
        text = Path(path).read_text(errors="replace")
    except FileNotFoundError:
        raise CheckFailed("pidfile does not exist (not started, or exited cleanly)", "not_running") from None
    except OSError as e:
        raise CheckFailed(f"pidfile: {e.strerror}", "error") from None
    first = text.strip().split("\n", 1)[0].strip()
    if not first.isdigit() or int(first) <= 0:
        raise CheckFailed(f"pidfile holds no pid ({first[:20]!r})", "error")
    return int(first)


def _name_matches(comm: str, name: str) -> bool:
    return comm == name or (len(name) > COMM_LEN and comm == name[:COMM_LEN])


def _matches(base: Path, sel: ProcessSelector, pattern: re.Pattern[str] | None) -> bool:
    if sel.process_name:
        comm = (base / "comm").read_text(errors="replace").rstrip("\n")
        if not _name_matches(comm, sel.process_name):
            return False
    if pattern is not None:
        args = (base / "cmdline").read_bytes().rstrip(b"\0").replace(b"\0", b" ")
        if not pattern.search(args.decode(errors="replace")):
            return False
    return True


def find_processes(proc: Path, sel: ProcessSelector) -> list[ProcInfo]:
    """Every process the selector matches; blocking (reads /proc/PID/*), so call it off the loop."""
    pattern = re.compile(sel.cmdline) if sel.cmdline else None
    if sel.pidfile:
        pid = _pid_from_file(sel.pidfile)
        try:
            matched = _matches(proc / str(pid), sel, pattern)
            info = read_status(proc, pid)
        except (FileNotFoundError, ProcessLookupError):
            info = None
        if info is None:
            raise CheckFailed(f"pid {pid} from the pidfile is not running (stale pidfile)", "not_running")
        if not matched:
            raise CheckFailed(f"pid {pid} from the pidfile is another program (pid reused after a crash?)",
                              "not_running")
        return [info]
    me = os.getpid()  # like pgrep, never match the agent itself
    out = []
    for pid in sorted(int(d) for d in os.listdir(proc) if d.isdigit()):
        try:
            if pid == me or not _matches(proc / str(pid), sel, pattern):
                continue
        except (FileNotFoundError, ProcessLookupError):
            continue  # exited while we looked
        info = read_status(proc, pid)
        if info is not None:
            out.append(info)
    return out

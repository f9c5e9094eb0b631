"""fds: file handles in use against fs.file-max, or a process's open fds against its RLIMIT_NOFILE."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field

from agent.model import Observation
from agent.probes.base import CheckBase, CheckFailed, Context
from agent.probes.blocking import blocking
from agent.probes.procfs import ProcessSelector, ProcInfo, find_processes


class Config(ProcessSelector, CheckBase):
    type: Literal["fds"]
    max_used_percent: float = Field(default=90.0, gt=0, le=100, description="handles in use above this fails")

    def threshold(self) -> str:
        what = f"fds of {self.describe()} vs RLIMIT_NOFILE" if self.selects() else "file handles vs fs.file-max"
        return f"{what} <= {self.max_used_percent:g}%"


def read_system(proc: Path) -> tuple[int, int]:
    allocated, unused, maximum = (int(x) for x in (proc / "sys" / "fs" / "file-nr").read_text().split()[:3])
    return allocated - unused, maximum


def nofile_limit(proc: Path, pid: int) -> int | None:
    """The soft RLIMIT_NOFILE from /proc/PID/limits; None when unlimited."""
    for line in (proc / str(pid) / "limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft = line[len("Max open files"):].split()[0]
            return None if soft == "unlimited" else int(soft)
    raise ValueError(f"{proc / str(pid) / 'limits'} has no 'Max open files' line")


def read_processes(proc: Path, sel: ProcessSelector) -> list[tuple[ProcInfo, int, int | None]]:
    """(process, open fds, soft limit) for every live process the selector matches."""
    out = []
    for p in find_processes(proc, sel):
        if p.state in "ZX":
            continue  # a zombie has no fds left
        try:
            out.append((p, len(os.listdir(proc / str(p.pid) / "fd")), nofile_limit(proc, p.pid)))
        except FileNotFoundError:
            continue  # exited while we counted
        except PermissionError:
            raise CheckFailed(f"permission denied reading {proc / str(p.pid) / 'fd'} (run the agent as the "
                              "process's user or give it CAP_DAC_READ_SEARCH)", "permission") from None
    return out


async def probe(cfg: Config, ctx: Context) -> Observation:
    if not cfg.selects():
        used, maximum = await blocking(ctx, cfg.name, "fds", read_system, ctx.proc)
        percent = round(100.0 * used / maximum, 2) if maximum else 0.0
        obs = Observation(value=percent, unit="percent", detail=f"{used} of {maximum} file handles in use",
                          values=(("open", float(used), "count"), ("limit", float(maximum), "count")))
        if percent > cfg.max_used_percent:
            raise CheckFailed(f"fds: {used} of {maximum} file handles in use ({percent:.1f}%) "
                              f"> {cfg.max_used_percent:g}% of fs.file-max", "threshold", observation=obs)
        return obs

    label = f"fds {cfg.describe()}"
    try:
        found = await blocking(ctx, cfg.name, label, read_processes, ctx.proc, cfg)
    except CheckFailed as e:
        raise CheckFailed(f"{label}: {e.reason}", e.kind) from None
    if not found:
        raise CheckFailed(f"{label}: no such process running", "not_running")

    def fill(row: tuple[ProcInfo, int, int | None]) -> float:
        return 100.0 * row[1] / row[2] if row[2] else 0.0

    proc, count, limit = max(found, key=fill)  # the process closest to its limit speaks for all
    percent = round(fill((proc, count, limit)), 2)
    shown = "unlimited" if limit is None else str(limit)
    obs = Observation(value=percent, unit="percent",
                      detail=f"pid {proc.pid} ({proc.name}): {count} fds open of {shown}"
                             + (f" (worst of {len(found)})" if len(found) > 1 else ""),
                      values=(("open", float(count), "count"), ("limit", float(limit or 0), "count")))
    if percent > cfg.max_used_percent:
        raise CheckFailed(f"{label}: pid {proc.pid} has {count} of {shown} fds open ({percent:.1f}%) "
                          f"> {cfg.max_used_percent:g}% of RLIMIT_NOFILE", "threshold", observation=obs)
    return obs

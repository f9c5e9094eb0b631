"""process: a process picked by pidfile, name or command line is running (not a zombie), within RSS and threads."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from agent.fields import ByteSize, format_size, human_size
from agent.model import Observation
from agent.probes.base import CheckBase, CheckFailed, Context
from agent.probes.blocking import blocking
from agent.probes.procfs import ProcessSelector, find_processes

# States in which a process exists but does no work: a zombie has exited and waits for its parent;
# a stopped (SIGSTOP) or traced process is frozen. None of them serves anyone.
NOT_RUNNING = {"Z": "zombie", "X": "dead", "T": "stopped", "t": "stopped by a debugger"}


class Config(ProcessSelector, CheckBase):
    type: Literal["process"]
    min_count: int = Field(default=1, ge=1, description="at least this many matching processes must be running")
    max_rss: ByteSize | None = Field(default=None, description="a process with more resident memory fails")
    max_threads: int | None = Field(default=None, ge=1, description="a process with more threads fails")

    @model_validator(mode="after")
    def _selects(self) -> Config:
        if not self.selects():
            raise ValueError("set pidfile, process_name or cmdline (several may be set: all must match)")
        return self

    def threshold(self) -> str:
        parts = [f"{self.min_count}+ running" if self.min_count > 1 else "running"]
        if self.max_rss is not None:
            parts.append(f"rss <= {format_size(self.max_rss)}")
        if self.max_threads is not None:
            parts.append(f"threads <= {self.max_threads}")
        return ", ".join(parts)


async def probe(cfg: Config, ctx: Context) -> Observation:
    label = f"process {cfg.describe()}"
    try:
        found = await blocking(ctx, cfg.name, label, find_processes, ctx.proc, cfg)
    except CheckFailed as e:
        raise CheckFailed(f"{label}: {e.reason}", e.kind) from None
    running = [p for p in found if p.state not in NOT_RUNNING]
    idle = [p for p in found if p.state in NOT_RUNNING]
    if len(running) < cfg.min_count:
        have = f"{len(running)} running" if cfg.min_count > 1 or running else "not running"
        need = f" (need {cfg.min_count})" if cfg.min_count > 1 else ""
        dead = ", ".join(f"pid {p.pid} {NOT_RUNNING[p.state]}" for p in idle[:5])
        raise CheckFailed(f"{label}: {have}{need}" + (f"; {dead}" if dead else ""),
                          "zombie" if idle else "not_running",
                          observation=Observation(value=float(len(running)), unit="count"))
    rss = max(running, key=lambda p: p.rss)
    threads = max(running, key=lambda p: p.threads)
    pids = ", ".join(str(p.pid) for p in running[:5]) + (", ..." if len(running) > 5 else "")
    obs = Observation(
        value=float(len(running)),
        unit="count",
        detail=f"pid {pids}; rss {human_size(rss.rss)}, {threads.threads} thread(s)"
               + (" (largest)" if len(running) > 1 else ""),
        values=(("rss", float(rss.rss), "bytes"), ("threads", float(threads.threads), "count")),
    )
    if cfg.max_rss is not None and rss.rss > cfg.max_rss:
        raise CheckFailed(f"{label}: pid {rss.pid} rss {human_size(rss.rss)} > {human_size(cfg.max_rss)}",
                          "rss", observation=obs)
    if cfg.max_threads is not None and threads.threads > cfg.max_threads:
        raise CheckFailed(f"{label}: pid {threads.pid} has {threads.threads} threads > {cfg.max_threads}",
                          "threads", observation=obs)
    return obs

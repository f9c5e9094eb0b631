"""cpu: CPU utilisation over a window, from /proc/stat counters kept between samples, stays under a bound."""

from __future__ import annotations

import asyncio
from typing import Annotated, Literal

from pydantic import Field, ValidationInfo, field_validator

from agent.fields import DAY, Duration, format_duration
from agent.model import Observation
from agent.probes.base import CheckBase, CheckFailed, Context
from agent.probes.blocking import kernel_read
from agent.probes.procfs import CpuTimes, read_cpu

FIRST_SAMPLE = 0.2  # seconds between the two reads of a first sample (capped at a quarter of the timeout)
MIN_SPAN = 0.1  # seconds: a shorter span holds too few clock ticks (10 ms each) to mean anything
MAX_KEPT = 1000  # samples kept for a window, whatever window / interval says


class Config(CheckBase):
    type: Literal["cpu"]
    max_percent: float = Field(default=95.0, gt=0, le=100, description="utilisation above this fails")
    window: Annotated[float, Duration(DAY)] = Field(
        default=0.0, description="average over this long; 0 = since the previous sample")

    @field_validator("window")
    @classmethod
    def _window_covers_interval(cls, v: float, info: ValidationInfo) -> float:
        interval = info.data.get("interval")
        if v and interval is not None and v < interval:
            raise ValueError(f"must be 0 or at least interval ({format_duration(interval)})")
        return v

    def threshold(self) -> str:
        over = f" over {format_duration(self.window)}" if self.window else ""
        return f"busy <= {self.max_percent:g}%{over}"


def _percent(part: int, whole: int) -> float:
    return round(100.0 * part / whole, 2)


async def probe(cfg: Config, ctx: Context) -> Observation:
    loop = asyncio.get_running_loop()
    key = ("cpu", cfg.name)
    kept: list[tuple[float, CpuTimes]] = ctx.memo.get(key, [])
    if not kept:
        # No earlier sample: measure over a short pair of reads rather than report nothing, so the
        # check has a real value from its first sample (a check starts down until it rises anyway).
        first, _ = await kernel_read(ctx, cfg.name, "cpu", ("stat",), read_cpu, ctx.proc)
        kept = [(loop.time(), first)]
        await asyncio.sleep(min(FIRST_SAMPLE, cfg.timeout / 4))
    now = loop.time()
    current, cpus = await kernel_read(ctx, cfg.name, "cpu", ("stat",), read_cpu, ctx.proc)

    if current.total < kept[-1][1].total or current.busy < kept[-1][1].busy:
        ctx.memo[key] = [(now, current)]
        raise CheckFailed("cpu: /proc/stat counters went backwards; measuring again", "error")
    # The baseline is the newest sample at least `window` old (the previous one when window is 0),
    # but never one younger than MIN_SPAN: an early extra sample then reaches further back.
    span = max(cfg.window, MIN_SPAN)
    base = kept[0]
    for sample in kept:
        if now - sample[0] >= span:
            base = sample
    ctx.memo[key] = [s for s in kept if s[0] >= base[0]][-MAX_KEPT:] + [(now, current)]

    then = base[1]
    total = current.total - then.total
    if total == 0:
        raise CheckFailed("cpu: /proc/stat did not advance between samples", "error")
    busy = _percent(current.busy - then.busy, total)
    obs = Observation(
        value=busy,
        unit="percent",
        detail=f"{busy:.1f}% busy over {now - base[0]:.1f}s on {cpus} CPU(s)",
        values=(("iowait", _percent(current.iowait - then.iowait, total), "percent"),
                ("steal", _percent(current.steal - then.steal, total), "percent")),
    )
    if busy > cfg.max_percent:
        raise CheckFailed(f"cpu: {busy:.1f}% busy > {cfg.max_percent:g}% (over {now - base[0]:.1f}s)",
                          "threshold", observation=obs)
    return obs

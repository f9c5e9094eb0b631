"""swap: the share of swap space in use stays under a bound; a node without swap passes at 0%."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from agent.fields import human_size
from agent.model import Observation
from agent.probes.base import CheckBase, CheckFailed, Context
from agent.probes.blocking import kernel_read
from agent.probes.memory import read_meminfo

SWAP_KEYS = frozenset({"SwapTotal", "SwapFree"})


class Config(CheckBase):
    type: Literal["swap"]
    max_used_percent: float = Field(default=80.0, ge=0, le=100, description="swap in use above this fails")

    def threshold(self) -> str:
        return f"swap used <= {self.max_used_percent:g}%"


async def probe(cfg: Config, ctx: Context) -> Observation:
    info = await kernel_read(ctx, cfg.name, "swap", ("meminfo",), read_meminfo, ctx.proc, SWAP_KEYS)
    total = info.get("SwapTotal", 0)
    if total == 0:
        # Nothing can be swapped out, so swap can't be what hurts: pass, and say why.
        return Observation(value=0.0, unit="percent", detail="no swap configured",
                           values=(("used", 0.0, "bytes"), ("total", 0.0, "bytes")))
    used = total - info.get("SwapFree", 0)
    percent = round(100.0 * used / total, 2)
    obs = Observation(
        value=percent,
        unit="percent",
        detail=f"{percent:.1f}% used ({human_size(used)} of {human_size(total)})",
        values=(("used", float(used), "bytes"), ("total", float(total), "bytes")),
    )
    if percent > cfg.max_used_percent:
        raise CheckFailed(f"swap: {percent:.1f}% used ({human_size(used)} of {human_size(total)}) "
                          f"> {cfg.max_used_percent:g}%", "threshold", observation=obs)
    return obs

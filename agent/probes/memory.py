"""memory: the share of memory in use (MemTotal - MemAvailable) stays under a bound."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field

from agent.fields import ByteSize, format_size, human_size
from agent.model import Observation
from agent.probes.base import CheckBase, CheckFailed, Context, headroom
from agent.probes.blocking import kernel_read


class Config(CheckBase):
    type: Literal["memory"]
    max_used_percent: float = Field(default=95.0, gt=0, le=100)
    min_available: ByteSize = Field(default=0, description="MemAvailable below this fails; 0 = off")

    def threshold(self) -> str:
        extra = f", available >= {format_size(self.min_available)}" if self.min_available else ""
        return f"used <= {self.max_used_percent:g}%{extra}"


MEMORY_KEYS = frozenset({"MemTotal", "MemFree", "MemAvailable"})


def read_meminfo(proc: Path, keys: frozenset[str] | None = None) -> dict[str, int]:
    """/proc/meminfo as {key: bytes}: every key, or only `keys`, read up to the line of the last of them (a
    sample of an idle agent parses 3 lines of about 55). A line of a wanted key that does not parse raises,
    as in the full read; with `keys`, lines of other keys are not looked at."""
    with open(os.path.join(proc, "meminfo"), encoding="utf-8") as f:  # not pathlib: this runs every sample
        text = f.read()
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if keys is not None and key not in keys:
            continue
        parts = rest.split()
        if parts:
            out[key] = int(parts[0]) * (1024 if len(parts) > 1 and parts[1] == "kB" else 1)
            if keys is not None and len(out) == len(keys):
                break
    return out


async def probe(cfg: Config, ctx: Context) -> Observation:
    info = await kernel_read(ctx, cfg.name, "memory", ("meminfo",), read_meminfo, ctx.proc, MEMORY_KEYS)
    total = info["MemTotal"]
    available = info.get("MemAvailable", info.get("MemFree", 0))  # MemAvailable exists since Linux 3.14
    used = 100.0 * (total - available) / total
    obs = Observation(
        value=round(used, 2),
        unit="percent",
        detail=f"{used:.1f}% used, {human_size(available)} available of {human_size(total)}",
        values=(("available", float(available), "bytes"), ("total", float(total), "bytes")),
        headroom=headroom(used, cfg.max_used_percent, 0.0),
    )
    if used > cfg.max_used_percent:
        raise CheckFailed(
            f"memory: {used:.1f}% used > {cfg.max_used_percent:g}%", "threshold", observation=obs
        )
    if available < cfg.min_available:
        raise CheckFailed(f"memory: {human_size(available)} available < {human_size(cfg.min_available)}",
                          "threshold", observation=obs)
    return obs

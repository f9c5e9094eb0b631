"""disk: a filesystem is writable and has free space and inodes left."""

from __future__ import annotations

import asyncio
import os
from typing import Literal

from pydantic import Field

from agent.model import Observation
from agent.probes.base import CheckBase, CheckFailed, Context, headroom


class Config(CheckBase):
    type: Literal["disk"]
    path: str = Field(default="/", min_length=1)
    min_free_percent: float = Field(default=5.0, ge=0, le=100)
    min_free_bytes: int = Field(default=0, ge=0)
    min_free_inodes_percent: float = Field(default=0.0, ge=0, le=100)
    fail_read_only: bool = True

    def threshold(self) -> str:
        return f"free >= {self.min_free_percent:g}%"


async def probe(cfg: Config, ctx: Context) -> Observation:
    # statvfs on a hung network mount blocks: run it in a thread under the runner's timeout.
    try:
        st = await asyncio.to_thread(os.statvfs, cfg.path)
    except OSError as e:
        raise CheckFailed(f"disk {cfg.path}: {e.strerror}", "error") from None
    total = st.f_blocks * st.f_frsize
    free = st.f_bavail * st.f_frsize
    free_pct = 100.0 * free / total if total else 0.0
    # The tightest of the bounds in force is the one that will fail first.
    margins = [headroom(free_pct, cfg.min_free_percent, 100.0)]
    if cfg.min_free_bytes:
        margins.append(headroom(free, cfg.min_free_bytes, total))
    if cfg.min_free_inodes_percent and st.f_files:
        margins.append(headroom(100.0 * st.f_favail / st.f_files, cfg.min_free_inodes_percent, 100.0))
    known = [m for m in margins if m is not None]
    obs = Observation(
        value=round(free_pct, 2),
        unit="percent",
        detail=f"{free_pct:.1f}% free",
        values=(("free_bytes", float(free), "bytes"),),
        headroom=min(known) if known else None,
    )
    if cfg.fail_read_only and st.f_flag & os.ST_RDONLY:
        raise CheckFailed(f"disk {cfg.path}: read-only filesystem", "read_only", observation=obs)
    if free_pct < cfg.min_free_percent:
        raise CheckFailed(
            f"disk {cfg.path}: {free_pct:.1f}% free < {cfg.min_free_percent:g}%", "threshold", observation=obs
        )
    if free < cfg.min_free_bytes:
        raise CheckFailed(f"disk {cfg.path}: {free} bytes free < {cfg.min_free_bytes}", "threshold", observation=obs)
    if cfg.min_free_inodes_percent and st.f_files:
        inodes = 100.0 * st.f_favail / st.f_files
        if inodes < cfg.min_free_inodes_percent:
            raise CheckFailed(
                f"disk {cfg.path}: {inodes:.1f}% inodes free < {cfg.min_free_inodes_percent:g}%",
                "threshold",
                observation=obs,
            )
    return obs

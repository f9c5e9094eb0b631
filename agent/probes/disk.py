"""disk: a filesystem is writable and has free space and inodes left."""

from __future__ import annotations

import os
from typing import Literal

from pydantic import Field

from agent.fields import ByteSize, format_size, human_size
from agent.model import Observation
from agent.probes.base import CheckBase, CheckFailed, Context, headroom
from agent.probes.blocking import blocking


class Config(CheckBase):
    type: Literal["disk"]
    path: str = Field(default="/", min_length=1)
    min_free_percent: float = Field(default=5.0, ge=0, le=100)
    min_free_bytes: ByteSize = 0
    min_free_inodes_percent: float = Field(default=0.0, ge=0, le=100)
    fail_read_only: bool = True

    def threshold(self) -> str:
        parts = [f"free >= {self.min_free_percent:g}%"]
        if self.min_free_bytes:
            parts.append(f"free >= {format_size(self.min_free_bytes)}")
        if self.min_free_inodes_percent:
            parts.append(f"inodes free >= {self.min_free_inodes_percent:g}%")
        if self.fail_read_only:
            parts.append("writable")
        return ", ".join(parts)


async def probe(cfg: Config, ctx: Context) -> Observation:
    label = f"disk {cfg.path}"
    # statvfs on a hung network mount blocks in the kernel: off the loop, under the runner's timeout.
    try:
        st = await blocking(ctx, cfg.name, label, os.statvfs, cfg.path)
    except OSError as e:
        raise CheckFailed(f"{label}: {e.strerror}", "error") from None
    total = st.f_blocks * st.f_frsize
    free = st.f_bavail * st.f_frsize  # what an unprivileged writer can use (root's reserve excluded)
    free_pct = 100.0 * free / total if total else 0.0
    inodes_pct = 100.0 * st.f_favail / st.f_files if st.f_files else 100.0  # no inode limit (btrfs, tmpfs)
    # The tightest of the bounds in force is the one that will fail first.
    margins = [headroom(free_pct, cfg.min_free_percent, 100.0)]
    if cfg.min_free_bytes:
        margins.append(headroom(free, cfg.min_free_bytes, total))
    if cfg.min_free_inodes_percent and st.f_files:
        margins.append(headroom(inodes_pct, cfg.min_free_inodes_percent, 100.0))
    known = [m for m in margins if m is not None]
    obs = Observation(
        value=round(free_pct, 2),
        unit="percent",
        detail=f"{free_pct:.1f}% free ({human_size(free)}), {inodes_pct:.1f}% inodes free",
        values=(("free_bytes", float(free), "bytes"), ("inodes_free", round(inodes_pct, 2), "percent")),
        headroom=min(known) if known else None,
    )
    if cfg.fail_read_only and st.f_flag & os.ST_RDONLY:
        raise CheckFailed(f"{label}: read-only filesystem", "read_only", observation=obs)
    if free_pct < cfg.min_free_percent:
        raise CheckFailed(f"{label}: {free_pct:.1f}% free < {cfg.min_free_percent:g}%", "threshold", observation=obs)
    if free < cfg.min_free_bytes:
        raise CheckFailed(f"{label}: {human_size(free)} free < {human_size(cfg.min_free_bytes)}", "threshold",
                          observation=obs)
    if inodes_pct < cfg.min_free_inodes_percent:
        raise CheckFailed(f"{label}: {inodes_pct:.1f}% inodes free < {cfg.min_free_inodes_percent:g}%",
                          "threshold", observation=obs)
    return obs

"""disk: a filesystem is writable and has free space and inodes left."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
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

    def preflight(self, proc: Path = Path("/proc")) -> tuple[str, ...]:
        if not os.path.exists(self.path):
            return (f"path: {self.path} does not exist on this host",)
        return ()


@dataclass(frozen=True, slots=True)
class Mount:
    """One line of /proc/PID/mountinfo: a mount in this mount namespace and the filesystem under it."""

    point: str
    options: frozenset[str]  # this mount's own flags: this namespace's view (a read-only bind mount)
    fstype: str
    source: str
    super_options: frozenset[str]  # the filesystem's (superblock) flags, the same in every namespace


def _unescape(field: str) -> str:
    # The kernel writes space, tab, newline and backslash in paths as octal escapes (\040).
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), field)


def parse_mountinfo(text: str) -> list[Mount]:
    """Mounts in the order listed; lines that do not parse are skipped."""
    out = []
    for line in text.splitlines():
        fields = line.split(" ")
        if "-" not in fields[6:]:
            continue
        sep = fields.index("-", 6)  # optional fields (shared:N, master:N) sit between 6 and the "-"
        if len(fields) < sep + 4:
            continue
        out.append(Mount(point=_unescape(fields[4]), options=frozenset(fields[5].split(",")),
                         fstype=fields[sep + 1], source=_unescape(fields[sep + 2]),
                         super_options=frozenset(fields[sep + 3].split(","))))
    return out


def mount_of(mounts: list[Mount], path: str) -> Mount | None:
    """The mount that holds the absolute, resolved `path`: the longest mount point above it, the last
    listed of equals (a later mount on the same point hides the earlier one)."""
    best: Mount | None = None
    for m in mounts:
        if (path == m.point or path.startswith(m.point.rstrip("/") + "/")) and (
                best is None or len(m.point) >= len(best.point)):
            best = m
    return best


def read(proc: Path, path: str) -> tuple[os.statvfs_result, Mount | None, str | None]:
    """statvfs of `path` and, when it is read-only, the mount that holds it (or why it is unknown)."""
    st = os.statvfs(path)
    if not st.f_flag & os.ST_RDONLY:
        return st, None, None
    source = proc / "self" / "mountinfo"
    try:
        mount = mount_of(parse_mountinfo(source.read_text()), os.path.realpath(path))
    except OSError as e:
        return st, None, f"cannot read {source}: {e.strerror}"
    return st, mount, None if mount else f"no mount holds it in {source}"


async def probe(cfg: Config, ctx: Context) -> Observation:
    label = f"disk {cfg.path}"
    # statvfs on a hung network mount blocks in the kernel: off the loop, under the runner's timeout.
    try:
        st, mount, unknown = await blocking(ctx, cfg.name, label, read, ctx.proc, cfg.path)
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
    # statvfs says read-only both when the filesystem is (the kernel remounted it after an I/O error, or
    # an operator did: its superblock is read-only for every writer on the node) and when only this mount
    # is (a read-only bind mount such as systemd's ProtectSystem= or a read-only volume in a container:
    # the applications writing there are not affected). Only the first is a broken disk.
    view_only = mount is not None and "ro" in mount.options and "ro" not in mount.super_options
    detail = f"{free_pct:.1f}% free ({human_size(free)}), {inodes_pct:.1f}% inodes free"
    if view_only:
        detail += "; mounted read-only for this agent, the filesystem is writable"
    obs = Observation(
        value=round(free_pct, 2),
        unit="percent",
        detail=detail,
        values=(("free_bytes", float(free), "bytes"), ("inodes_free", round(inodes_pct, 2), "percent")),
        headroom=min(known) if known else None,
    )
    if cfg.fail_read_only and st.f_flag & os.ST_RDONLY and not view_only:
        said = f" ({unknown}, so it counts as the filesystem)" if unknown else ""
        raise CheckFailed(f"{label}: read-only filesystem{said}", "read_only", observation=obs)
    if free_pct < cfg.min_free_percent:
        raise CheckFailed(f"{label}: {free_pct:.1f}% free < {cfg.min_free_percent:g}%", "threshold", observation=obs)
    if free < cfg.min_free_bytes:
        raise CheckFailed(f"{label}: {human_size(free)} free < {human_size(cfg.min_free_bytes)}", "threshold",
                          observation=obs)
    if inodes_pct < cfg.min_free_inodes_percent:
        raise CheckFailed(f"{label}: {inodes_pct:.1f}% inodes free < {cfg.min_free_inodes_percent:g}%",
                          "threshold", observation=obs)
    return obs

"""file: a heartbeat file the application touches exists, is younger than max_age, and holds what it should."""

from __future__ import annotations

import os
import re
import stat
import time
from typing import Annotated, Literal

from pydantic import Field

from agent.fields import DAY, AbsolutePath, Duration, Regex, format_duration
from agent.model import Observation
from agent.probes.base import CheckBase, CheckFailed, Context
from agent.probes.blocking import blocking

MAX_READ = 64 * 1024  # bytes of the file that `contains` and `matches` look at


class Config(CheckBase):
    type: Literal["file"]
    path: AbsolutePath = Field(description="absolute path of the file")
    max_age: Annotated[float, Duration(30 * DAY, positive=True)] | None = Field(
        default=None, description="modified longer ago than this fails")
    contains: str | None = Field(default=None, min_length=1, description="the file must contain this text")
    matches: Regex | None = Field(default=None, description="the file must match this regex")

    def threshold(self) -> str:
        parts = ["exists"]
        if self.max_age is not None:
            parts.append(f"modified within {format_duration(self.max_age)}")
        if self.contains is not None:
            parts.append(f"contains {self.contains!r}")
        if self.matches is not None:
            parts.append(f"matches /{self.matches}/")
        return ", ".join(parts)


def read(path: str, content: bool) -> tuple[os.stat_result, float, bytes]:
    st = os.stat(path)
    # File times are wall-clock times (the kernel stamps them from CLOCK_REALTIME), so the age must be
    # measured against the wall clock too; the monotonic clock has nothing to compare with here.
    now = time.time()
    data = b""
    if content and stat.S_ISREG(st.st_mode):
        with open(path, "rb") as f:
            data = f.read(MAX_READ)
    return st, now, data


async def probe(cfg: Config, ctx: Context) -> Observation:
    label = f"file {cfg.path}"
    want_content = cfg.contains is not None or cfg.matches is not None
    try:
        st, now, data = await blocking(ctx, cfg.name, label, read, cfg.path, want_content)
    except FileNotFoundError:
        raise CheckFailed(f"{label}: does not exist", "missing") from None
    except OSError as e:
        raise CheckFailed(f"{label}: {e.strerror}", "error") from None
    age = now - st.st_mtime
    obs = Observation(value=round(max(age, 0.0), 3), unit="seconds", detail=f"modified {age:.1f}s ago",
                      values=(("size", float(st.st_size), "bytes"),))
    if cfg.max_age is not None:
        if age > cfg.max_age:
            raise CheckFailed(f"{label}: last modified {age:.1f}s ago > {format_duration(cfg.max_age)} "
                              "(has the application stalled?)", "stale", observation=obs)
        if -age > cfg.max_age:
            # A clock stepped back this far would keep a dead heartbeat looking fresh for that long.
            raise CheckFailed(f"{label}: modified {-age:.1f}s in the future (clock stepped back?)", "clock",
                              observation=obs)
    if want_content and not stat.S_ISREG(st.st_mode):
        raise CheckFailed(f"{label}: not a regular file, cannot match its content", "content", observation=obs)
    text = data.decode(errors="replace")
    if cfg.contains is not None and cfg.contains not in text:
        raise CheckFailed(f"{label}: does not contain {cfg.contains!r}", "content", observation=obs)
    if cfg.matches is not None and not re.search(cfg.matches, text, re.MULTILINE):
        raise CheckFailed(f"{label}: does not match /{cfg.matches}/", "content", observation=obs)
    return obs

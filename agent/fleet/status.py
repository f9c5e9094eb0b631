"""`healthgate fleet status`: the group's members as the store sees them, as a table or JSON."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import asdict
from typing import TextIO

from agent.fleet.backends import open_store
from agent.fleet.config import FleetConfig
from agent.fleet.store import Group, Member
from agent.text import tidy_all

EXIT_OK, EXIT_CONFIG, EXIT_UNKNOWN = 0, 2, 3

WORDS = {"up": "serving", "held": "held", "shed": "shed", "down": "down"}
WHY = {"up": "", "held": "serving although shared reasons fail (the budget is spent)",
       "shed": "down with a grant", "down": "down for local reasons"}


def _ago(seconds: float | None) -> str:
    if seconds is None or seconds < 0:
        return "-"
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def describe(m: Member, now: float) -> tuple[str, str, str, str]:
    """(node, status, for how long, why) of one member, in words."""
    since = _ago(now - m.since) if m.since else "-"
    reasons = ", ".join(m.reasons)
    if not m.alive:
        silent = f" {_ago(m.silent_for)} ago" if m.silent_for is not None else ""
        return m.node, "silent", since, f"stopped heartbeating{silent} (last: {WORDS[m.status]}); counts as not serving"
    why = WHY[m.status] + (f": {reasons}" if reasons and m.status != "up" else "")
    return m.node, WORDS[m.status], since, why


def render(cfg: FleetConfig, group: Group, now: float) -> str:
    rows = [("NODE", "STATUS", "FOR", "WHY"), *(describe(m, now) for m in group.members)]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"fleet group {cfg.group!r} on {cfg.store_display}: {group.expected} expected, {group.serving} serving, "
             f"at most {group.allowed} may be down (max_down {cfg.max_down})"]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r[:3], widths, strict=True)) + "  " + r[3] for r in rows]
    return "\n".join(line.rstrip() for line in lines)


async def fetch(cfg: FleetConfig) -> Group:
    store = open_store(cfg)
    try:
        return await store.members()
    finally:
        await store.close()


async def fetch_within(cfg: FleetConfig, seconds: float) -> Group:
    async with asyncio.timeout(seconds):
        return await fetch(cfg)


def run_fleet_status(cfg: FleetConfig, timeout: float, as_json: bool, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    try:
        group = asyncio.run(fetch_within(cfg, timeout))
    except Exception as e:  # noqa: BLE001 - any store failure is reported in words
        print(f"healthgate: fleet store {cfg.store_display}: {'timed out' if isinstance(e, TimeoutError) else e}",
              file=sys.stderr)
        return EXIT_UNKNOWN
    if as_json:
        doc = {"group": cfg.group, "store": cfg.store_display, "expected": group.expected,
               "serving": group.serving, "allowed_down": group.allowed,
               "members": [asdict(m) for m in group.members]}
        print(json.dumps(tidy_all(doc), indent=2), file=out)
    else:
        print(render(cfg, group, time.time()), file=out)
    return EXIT_OK

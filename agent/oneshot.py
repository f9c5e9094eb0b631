"""`healthgate check`: every check once, one sample deciding each, as a table and an exit code."""

from __future__ import annotations

import asyncio
import os
import sys

from agent.config import Config
from agent.model import Result
from agent.probes.base import Context
from agent.runner import Runner

GREEN, RED, DIM, BOLD, RESET = "\033[32m", "\033[31m", "\033[2m", "\033[1m", "\033[0m"


async def sample_all(cfg: Config) -> list[Result]:
    ctx = Context()
    try:
        runner = Runner(ctx)
        return list(await asyncio.gather(*(runner.run(c) for c in cfg.checks)))
    finally:
        await ctx.close()


def table(cfg: Config, results: list[Result], color: bool) -> str:
    def paint(text: str, code: str) -> str:
        return f"{code}{text}{RESET}" if color else text

    rows = [("CHECK", "TYPE", "CRIT", "STATUS", "VALUE", "TIME", "DETAIL")]
    for check, r in zip(cfg.checks, results, strict=True):
        obs = r.observation
        value = "" if obs is None or obs.value is None else f"{obs.value:g} {obs.unit}".strip()
        detail = r.reason if not r.ok else (obs.detail if obs else "")
        rows.append((check.name, check.type, "yes" if check.critical else "no", "pass" if r.ok else "FAIL",
                     value, f"{r.duration * 1000:.0f}ms", detail))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = []
    for n, row in enumerate(rows):
        cells = [cell.ljust(w) for cell, w in zip(row, widths, strict=False)] + [row[-1]]
        if n == 0:
            cells = [paint(c, BOLD) for c in cells]
        else:
            cells[3] = paint(cells[3], GREEN if row[3] == "pass" else RED)
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def run_once(cfg: Config, color: str = "auto") -> int:
    results = asyncio.run(sample_all(cfg))
    use_color = color == "always" or (color == "auto" and sys.stdout.isatty() and not os.environ.get("NO_COLOR"))
    print(table(cfg, results, use_color))
    failing = [c.name for c, r in zip(cfg.checks, results, strict=True) if c.critical and not r.ok]
    if failing:
        print(f"\nCRITICAL: node would be DOWN ({', '.join(failing)})")
        return 2
    print(f"\nOK: node would be UP ({len(results)} check(s))")
    return 0

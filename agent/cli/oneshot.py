"""`healthgate check`: every check once, one sample deciding each, as a table and an exit code."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from agent.cli import render
from agent.config import Config
from agent.model import CheckState, Result, Status
from agent.probes.base import Context
from agent.runner import Runner
from agent.serving.http_api import check_entry
from agent.verdict import view


async def sample_all(cfg: Config) -> list[Result]:
    ctx = Context()
    try:
        runner = Runner(ctx)
        return list(await asyncio.gather(*(runner.run(c) for c in cfg.checks)))
    finally:
        await ctx.close()


def status_of(cfg: Config, results: list[Result]) -> dict[str, Any]:
    """The checks as /status would show them if this one sample had decided each: the status page's rows."""
    out = {}
    for check, r in zip(cfg.checks, results, strict=True):
        state = CheckState(status=Status.UP if r.ok else Status.DOWN, consecutive_ok=int(r.ok),
                           consecutive_fail=int(not r.ok), last=r, history=(r.ok,))
        out[f"{check.name}:{check.type}"] = [check_entry(view(check, state, cfg.policy), r.finished)]
    return {"checks": out}


def table(cfg: Config, results: list[Result], color: bool, width: int | None = None) -> str:
    return render.table(render.check_rows(status_of(cfg, results)), color, width)


def run_once(cfg: Config, color: str = "auto", width: int | None = None) -> int:
    results = asyncio.run(sample_all(cfg))
    print(table(cfg, results, render.use_color(color, sys.stdout), width))
    failing = [c.name for c, r in zip(cfg.checks, results, strict=True) if c.critical and not r.ok]
    if failing:
        print(f"\nCRITICAL: node would be DOWN ({', '.join(failing)})")
        return 2
    print(f"\nOK: node would be UP ({len(results)} check(s))")
    return 0

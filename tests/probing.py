"""Run one sample of one check the way the agent does, for probe tests."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from agent.config import parse_config
from agent.model import Result
from agent.probes.base import CheckBase, Context
from agent.runner import Runner
from tests.helpers import ROOT

PROC = Path(__file__).parent / "data" / "proc"  # recorded /proc trees, one per scenario


def check(**keys: Any) -> CheckBase:
    """One validated check from its keys (name defaults to the type)."""
    keys.setdefault("name", keys["type"])
    keys.setdefault("interval", 5)
    keys.setdefault("timeout", 2)
    return parse_config({"checks": [keys]}).checks[0]


async def sample(cfg: CheckBase, ctx: Context | None = None) -> Result:
    """One sample through the runner: its timeout, its exception net, its Result."""
    return await Runner(ctx or Context()).run(cfg)


def proc_copy(scenario: str, dest: Path) -> Path:
    """A writable copy of a recorded /proc tree, for tests that add to it or swap its files."""
    shutil.copytree(PROC / scenario, dest, dirs_exist_ok=True)
    return dest


def cli(*args: str) -> subprocess.CompletedProcess:
    """`healthgate ARGS...` as a subprocess from the project root, text output captured."""
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=30)

"""What every benchmark section shares: the run context, the section result, targets and agent configs."""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bench.servers import ROOT, Proc, Servers


@dataclass
class Ctx:
    """One benchmark run: its servers, its knobs, and the shared dependencies (started once)."""

    servers: Servers
    quick: bool
    reps: int
    duration: float  # seconds of one wrk run
    window: float  # seconds of one footprint/lag window
    nginx: Proc | None = None
    redis: Proc | None = None
    postgres: Proc | None = None

    def log(self, msg: str) -> None:
        print(f"[bench] {msg}", file=sys.stderr, flush=True)


@dataclass
class Target:
    """A target of the issue, and whether this run met it."""

    what: str
    target: str
    measured: str
    met: bool | None  # None: not measured in this run
    note: str = ""  # by how much and why, when missed


@dataclass
class Section:
    title: str
    markdown: str  # tables and notes
    targets: list[Target] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)  # for the plot and results.json
    plot: Callable[[Any], None] | None = None  # draws on a matplotlib Axes


def agent_config(checks: str | None = None, server: str = "", tables: str = "",
                 base: str = "config/healthgate.toml") -> str:
    """`base` (default: the default config) on a free loopback port; `checks` replaces its checks,
    `server` adds [server] keys and `tables` adds other tables (TOML text)."""
    text = (ROOT / base).read_text()
    if checks is not None:
        text = text[:text.index("[[checks]]")] if "[[checks]]" in text else text
    text, n = re.subn(r'(?m)^listen\s*=.*$', 'listen = "127.0.0.1:{port}"\n' + server, text, count=1)
    if n != 1:
        raise ValueError("config/healthgate.toml has no [server] listen line")
    # The bench stops agents with SIGTERM: no drain wait.
    text = re.sub(r'(?m)^shutdown_drain\s*=.*$', 'shutdown_drain = "0s"', text)
    if "[agent]" in text:
        text = text.replace("[agent]", "[agent]\nallow_root = true", 1)
    else:
        text += "\n[agent]\nallow_root = true\n"
    if tables:  # before any [[checks]] left in the text, so they stay the last array of tables
        i = text.find("[[checks]]")
        text = text + "\n" + tables + "\n" if i < 0 else text[:i] + tables + "\n\n" + text[i:]
    return text + "\n" + (checks or "")


def checks20(redis_port: int, nginx_port: int, interval: str = "1s") -> str:
    """20 checks at `interval`: 5 each of memory, disk, tcp (Redis) and http (nginx)."""
    out = []
    for i in range(5):
        out.append(f'[[checks]]\nname = "mem{i}"\ntype = "memory"\ninterval = "{interval}"\ntimeout = "500ms"\n'
                   "max_used_percent = 99\n")
        out.append(f'[[checks]]\nname = "disk{i}"\ntype = "disk"\npath = "/"\ninterval = "{interval}"\n'
                   'timeout = "500ms"\nmin_free_percent = 1\n')
        out.append(f'[[checks]]\nname = "tcp{i}"\ntype = "tcp"\nport = {redis_port}\ninterval = "{interval}"\n'
                   'timeout = "500ms"\n')
        out.append(f'[[checks]]\nname = "http{i}"\ntype = "http"\nurl = "http://127.0.0.1:{nginx_port}/dep"\n'
                   f'interval = "{interval}"\ntimeout = "500ms"\n')
    return "\n".join(out)


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)

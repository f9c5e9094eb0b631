"""The machine's description, the markdown report (RESULTS.md, the printed table) and the PNG plot."""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

from bench.core import Section, table
from bench.servers import PG_BIN


def _version(argv: list[str], pattern: str) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "not installed"
    m = re.search(pattern, out.stdout + out.stderr)
    return m.group(1) if m else "unknown"


def _package(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine() -> dict[str, str]:
    cpu = "unknown"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "CPU": cpu,
        "cores": str(os.cpu_count()),
        "kernel": platform.release(),
        "Python": platform.python_version(),
        "aiohttp": _package("aiohttp"),
        "uvloop": _package("uvloop"),
        "nginx": _version(["nginx", "-v"], r"nginx/(\S+)"),
        "HAProxy": _version(["haproxy", "-v"], r"version (\S+)"),
        "Redis": _version(["redis-server", "--version"], r"v=(\S+)"),
        "PostgreSQL": _version([str(PG_BIN / "postgres"), "--version"], r"\) (\S+)"),
        "wrk": _version(["wrk", "--version"], r"wrk (\S+)"),
        "node-exporter": _version(["prometheus-node-exporter", "--version"], r"version (\S+)"),
    }


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def targets_table(sections: list[Section]) -> str:
    rows = []
    for s in sections:
        for t in s.targets:
            verdict = {True: "met", False: "**missed**", None: "not measured"}[t.met]
            rows.append([t.what, t.target, t.measured, verdict, t.note])
    return table(["what", "target", "this run", "verdict", "by how much / why"], rows)


def render(sections: list[Section], info: dict[str, str], meta: dict[str, str], notes: str = "") -> str:
    head = (
        "# healthgate benchmark results\n\n"
        "Written by `make bench` (`python -m bench.run`). Every figure is a median over interleaved "
        "repetitions, with min and max; every comparison is a ratio taken in the same run, on the same "
        "machine. All traffic is on loopback.\n\n"
        + table(["machine", ""], [[k, v] for k, v in info.items()]) + "\n\n"
        + table(["run", ""], [[k, v] for k, v in meta.items()]) + "\n\n"
        + (notes + "\n\n" if notes else "")
        + "## Targets\n\n" + targets_table(sections) + "\n"
    )
    body = "".join(f"\n## {s.title}\n\n{s.markdown}\n" for s in sections)
    return head + body


def plot(sections: list[Section], path: Path) -> str | None:
    """One PNG with a panel per section that can draw; returns why not when matplotlib is missing."""
    drawable = [s for s in sections if s.plot is not None]
    if not drawable:
        return "nothing to plot"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (`pip install -e '.[bench]'`): no plot"
    cols = 2 if len(drawable) > 1 else 1
    rows = (len(drawable) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(7 * cols, 4.2 * rows), squeeze=False)
    for ax, s in zip(axes.flat, drawable, strict=False):
        s.plot(ax)
    for ax in list(axes.flat)[len(drawable):]:
        ax.axis("off")
    fig.suptitle("healthgate benchmarks (medians of interleaved repetitions)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return None


def write_json(sections: list[Section], info: dict, meta: dict, path: Path) -> None:
    doc = {"machine": info, "run": meta, "sections": {s.title: s.data for s in sections},
           "targets": [t.__dict__ for s in sections for t in s.targets]}
    path.write_text(json.dumps(doc, indent=1, default=str) + "\n")


def stamp() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z") + f" ({sys.platform})"

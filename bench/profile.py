"""The hot path's profile: py-spy samples of the agent while /health is flooded, summarised as text."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

from bench.core import Ctx, Section, agent_config, table
from bench.load import Flood
from bench.servers import BenchError, http_status, wait_until

_FRAME = re.compile(r"^(?P<func>.+?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def summarise(raw: str, top: int = 12) -> tuple[int, list[tuple[str, int]], list[tuple[str, int]],
                                                list[tuple[str, int]]]:
    """From py-spy's raw (collapsed) output: total samples, the top functions by self and by inclusive
    samples, and the top source lines by self samples (where a function's own time goes)."""
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    lines: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        names = []
        for frame in stack.split(";"):
            m = _FRAME.match(frame)
            names.append(f"{m['func']} ({m['file']})" if m else frame)
        own[names[-1]] += n
        leaf = _FRAME.match(stack.split(";")[-1])
        lines[f"{leaf['file']}:{leaf['line']} ({leaf['func']})" if leaf and leaf["line"] else names[-1]] += n
        # Frames up to the event loop's run() are in every sample of the main thread: leave them out.
        runs = [i for i, name in enumerate(names) if name.startswith("Runner.run ")]
        for name in set(names[runs[-1] + 1:] if runs else names):
            incl[name] += n
    return total, own.most_common(top), incl.most_common(top), lines.most_common(top // 2)


def py_spy() -> str | None:
    here = Path(sys.executable).parent / "py-spy"
    return str(here) if here.exists() else shutil.which("py-spy")


def record(pid: int, seconds: float, rate: int = 250) -> str:
    """py-spy's raw samples of `pid` for `seconds` (uvloop's C time shows as the Python frame running it)."""
    spy = py_spy()
    assert spy is not None
    out = Path(f"/proc/{pid}/cwd").resolve() / f".py-spy-{pid}.txt"  # the agent's cwd: the project root
    try:
        res = subprocess.run([spy, "record", "-p", str(pid), "-d", str(max(1, round(seconds))), "-r", str(rate),
                              "-f", "raw", "-o", str(out), "--nonblocking"], capture_output=True, text=True,
                             timeout=seconds + 60)
        if res.returncode:  # e.g. no ptrace permission in a container
            raise BenchError(f"py-spy could not sample the agent: {res.stderr.strip()[-300:]}")
        return out.read_text()
    finally:
        out.unlink(missing_ok=True)


def run(ctx: Ctx) -> Section:
    if py_spy() is None:
        return Section("Profile of the hot path", "py-spy is not installed (`pip install -e '.[bench]'`): skipped.")
    variants = {
        "fast path (default)": ctx.servers.healthgate(agent_config(), loop="uvloop", name="hg-prof-fast"),
        "aiohttp only (fast_health = false)": ctx.servers.healthgate(agent_config(server="fast_health = false"),
                                                                     loop="uvloop", name="hg-prof-aiohttp"),
    }
    seconds = 3 if ctx.quick else 10
    parts, data = [], {}
    for name, proc in variants.items():
        url = f"http://127.0.0.1:{proc.port}/health"
        wait_until(lambda url=url: http_status(url) == 200, 60, f"{name} up", proc)
        flood = Flood(url, 50, seconds + 2)  # wrk in the background, a little longer than the sampling
        try:
            raw = record(proc.pid, seconds)
            load = flood.result()
        finally:
            flood.stop()
        ctx.servers.stop(proc)
        total, own, incl, lines = summarise(raw)
        data[name] = {"samples": total, "rps_under_profiler": load.rps, "self": own, "inclusive": incl,
                      "lines": lines}

        def pct(n: int, total: int = total) -> str:
            return f"{100 * n / total:.1f}%" if total else "-"

        parts.append(
            f"### {name}\n\n{total} samples at 250 Hz over {seconds} s of a 50-connection keep-alive flood "
            f"({load.rps:,.0f} requests/s while sampled).\n\n"
            + table(["function (self)", "share"], [[f"`{f}`", pct(n)] for f, n in own if n * 1000 >= total]) + "\n\n"
            + table(["function (inclusive, below the event loop)", "share"],
                    [[f"`{f}`", pct(n)] for f, n in incl if n * 1000 >= total]) + "\n\n"
            + table(["source line (self)", "share"], [[f"`{f}`", pct(n)] for f, n in lines if n * 1000 >= total])
        )
    md = ("py-spy `record --nonblocking` of the agent process while wrk floods /health. Time spent in C "
          "(uvloop, the HTTP parser, the send() system call) shows under the Python line that called it, "
          "e.g. `Runner.run` for the event loop itself and the `transport.write` line of the fast responder "
          "for sending. Rows under 0.1% are left out.\n\n" + "\n\n".join(parts))
    return Section("Profile of the hot path", md, data={"profile": data})

"""Section 4: idle footprint (RSS, CPU% of a core) of the agent beside prometheus-node-exporter."""

from __future__ import annotations

import statistics

from bench.core import Ctx, Section, Target, agent_config, checks20, table
from bench.load import footprints, import_costs
from bench.parse import Summary, ratios
from bench.servers import ROOT, http_status, wait_until

MB = 1024 * 1024


def run(ctx: Ctx) -> Section:
    s = ctx.servers
    assert ctx.redis and ctx.nginx
    procs = {
        "healthgate, default config": s.healthgate(agent_config(), name="hg-default"),
        "healthgate, default config, asyncio loop": s.healthgate(agent_config(), loop="asyncio",
                                                                 name="hg-default-asyncio"),
        "healthgate, 20 checks at 1 s": s.healthgate(agent_config(checks20(ctx.redis.port, ctx.nginx.port)),
                                                     name="hg-20checks"),
        "node-exporter (idle)": s.node_exporter(),
    }
    for name, p in list(procs.items())[:3]:
        wait_until(lambda p=p: http_status(f"http://127.0.0.1:{p.port}/health") == 200, 60, f"{name} up", p)
    windows = ctx.reps
    ctx.log(f"footprint: {windows} windows of {ctx.window:g} s")
    samples: dict[str, list] = {name: [] for name in procs}
    for w in range(windows):
        got = footprints({name: p.pid for name, p in procs.items()}, ctx.window)
        for name, fp in got.items():
            samples[name].append(fp)
        ctx.log(f"footprint: window {w + 1}/{windows}: "
                + ", ".join(f"{n} {fp.cpu_percent:.2f}% {fp.rss_median / MB:.1f} MB" for n, fp in got.items()))
    for p in procs.values():
        s.stop(p)
    ref = "node-exporter (idle)"
    stages, heavy = import_costs(str(ROOT))
    rows, data = [], {}
    for name, fps in samples.items():
        data[name] = {"cpu_percent": [f.cpu_percent for f in fps], "rss_bytes": [f.rss_median for f in fps],
                      "rss_max_bytes": [f.rss_max for f in fps], "pss_bytes": [f.pss for f in fps],
                      "uss_bytes": [f.uss for f in fps], "wakeups": [f.wakeups for f in fps]}
    for name, d in data.items():
        vs_rss = ratios(d["rss_bytes"], data[ref]["rss_bytes"]).fmt(1, 2, "×")
        vs_cpu = ratios(d["cpu_percent"], data[ref]["cpu_percent"]).fmt(1, 2, "×")
        rows.append([name, Summary.of(d["rss_bytes"]).fmt(1 / MB, 1), f"{max(d['rss_max_bytes']) / MB:.1f}",
                     Summary.of(d["pss_bytes"]).fmt(1 / MB, 1), Summary.of(d["uss_bytes"]).fmt(1 / MB, 1),
                     Summary.of(d["cpu_percent"]).fmt(1, 3), Summary.of(d["wakeups"]).fmt(1, 1), vs_rss, vs_cpu])
    default = data["healthgate, default config"]
    rss_med = statistics.median(default["rss_bytes"])
    cpu_med = statistics.median(default["cpu_percent"])
    wake = statistics.median(default["wakeups"])
    targets = [
        Target("idle, default config: RSS", "< 50 MB", f"{rss_med / MB:.1f} MB", rss_med < 50 * MB,
               "" if rss_med < 50 * MB else f"{(rss_med - 50 * MB) / MB:.1f} MB over: the interpreter, asyncio, "
               "aiohttp and pydantic's config models alone come to about that (see Footprint)"
               + (f"; client libraries loaded without use: {', '.join(heavy)}" if heavy else "")),
        Target("idle, default config: CPU", "< 0.5% of a core", f"{cpu_med:.3f}%", cpu_med < 0.5,
               "" if cpu_med < 0.5 else f"{cpu_med - 0.5:.3f} points over: {wake:.0f} event-loop wake-ups/s "
               "(heartbeat, state-file poll, check timers; see Footprint)"),
    ]
    md = (
        f"{windows} windows of {ctx.window:g} s, all three processes sampled over the same windows (CPU from "
        "utime+stime in /proc/PID/stat over the window, RSS = VmRSS from /proc/PID/status once a second; PSS "
        "and USS (private pages) from /proc/PID/smaps_rollup at the end of each window). "
        "node-exporter is idle (never scraped): the reference for a small resident agent. Median [min–max] "
        "over windows; ratios per window.\n\n"
        + table(["process", "RSS MB", "RSS max MB", "PSS MB", "USS MB", "CPU % of a core", "wake-ups/s",
                 "RSS / node-exporter", "CPU / node-exporter"], rows)
        + "\n\n`wake-ups/s`: context switches of the main thread (the event loop) per second; idle CPU is "
        "mostly their number times the cost of one loop iteration.\n\n"
        + "Where the memory goes: RSS after each stage of the agent's imports, in a fresh interpreter "
        "(shared libraries included, as in RSS):\n\n"
        + table(["import stage", "RSS added MB"], [[f"`{n}`", f"{b / MB:.1f}"] for n, b in stages])
        + (f"\n\nClient libraries imported at startup although the default config uses none of them: "
           f"{', '.join(heavy)}." if heavy else "")
    )
    return Section("Footprint", md, targets, {"footprint": data, "imports": stages, "heavy_imports": heavy},
                   plot=lambda ax: plot(ax, data))


def plot(ax, data: dict) -> None:
    names = list(data)
    rss = [statistics.median(data[n]["rss_bytes"]) / MB for n in names]
    cpu = [statistics.median(data[n]["cpu_percent"]) for n in names]
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], rss, 0.4, label="RSS MB", color="tab:blue")
    ax.set_ylabel("RSS MB")
    ax2 = ax.twinx()
    ax2.bar([x + 0.2 for x in xs], cpu, 0.4, label="CPU % of a core", color="tab:orange")
    ax2.set_ylabel("CPU % of a core")
    ax.set_xticks(list(xs), [n.replace(", ", "\n") for n in names], fontsize=7)
    ax.set_title("Idle footprint (blue RSS, orange CPU), median")

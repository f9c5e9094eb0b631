"""Section 4: idle footprint (RSS, CPU) of the agent beside a bare asyncio process, and its start-up time."""

from __future__ import annotations

import statistics
import time

from bench.core import Ctx, Section, Target, agent_config, checks20, table
from bench.load import Footprint, footprints, import_costs, machine_busy_s
from bench.parse import Summary, ratios
from bench.servers import ROOT, http_status, wait_until

MB = 1024 * 1024
RSS_TARGET = 45 * MB
CPU_RATIO_TARGET = 1.3
DEFAULT = "healthgate, default config"
BARE = "bare asyncio, waking every 100 ms"
INSTANCES = 3
DEPS = "healthgate, config/examples/dependencies.toml"
LOADED = "healthgate, default config, after one /status (aiohttp loaded)"


def startup(ctx: Ctx, reps: int) -> list[dict[str, float]]:
    """Seconds from exec to the first /live 200 (serving) and to the first /health 200 (checks risen)."""
    out = []
    for _ in range(reps):
        t0 = time.monotonic()
        proc = ctx.servers.healthgate(agent_config(), name="hg-startup")  # returns at the first /live 200
        live = time.monotonic() - t0
        wait_until(lambda p=proc: http_status(f"http://127.0.0.1:{p.port}/health", 1.0) == 200, 60,
                   "first 200", proc)
        out.append({"live": live, "health": time.monotonic() - t0})
        ctx.servers.stop(proc)
    return out


def run(ctx: Ctx) -> Section:
    s = ctx.servers
    assert ctx.redis and ctx.nginx
    # The default config and the bare loop run as INSTANCES processes each, and each window takes the median
    # of their figures: processes of the same program differ by 10 to 20% in idle CPU (where their memory
    # lands, which core they wake on), more than the margin the target is about.
    procs = {
        **{f"{DEFAULT} #{i + 1}": s.healthgate(agent_config(), name=f"hg-default-{i + 1}") for i in range(INSTANCES)},
        "healthgate, default config, asyncio loop": s.healthgate(agent_config(), loop="asyncio",
                                                                 name="hg-default-asyncio"),
        LOADED: s.healthgate(agent_config(), name="hg-default-loaded"),
        DEPS: s.healthgate(agent_config(base="config/examples/dependencies.toml"), name="hg-deps"),
        "healthgate, 20 checks at 1 s": s.healthgate(agent_config(checks20(ctx.redis.port, ctx.nginx.port)),
                                                     name="hg-20checks"),
        **{f"{BARE} #{i + 1}": s.bare(0.1, name=f"bare-{i + 1}") for i in range(INSTANCES)},
        "node-exporter (idle)": s.node_exporter(),
    }
    for name, p in procs.items():
        if not name.startswith("healthgate") or name == DEPS:  # DEPS stays down: none of its dependencies run
            continue
        wait_until(lambda p=p: http_status(f"http://127.0.0.1:{p.port}/health") == 200, 60, f"{name} up", p)
    http_status(f"http://127.0.0.1:{procs[LOADED].port}/status")  # the first request only aiohttp answers
    time.sleep(2)  # past start-up work (first samples, the GC freeze) before any window
    windows = ctx.reps
    ctx.log(f"footprint: {windows} windows of {ctx.window:g} s")
    samples: dict[str, list] = {name: [] for name in procs}
    rest: list[float] = []  # % of a core the rest of the machine was busy (the bench, its servers, the OS)
    for w in range(windows):
        busy, t0 = machine_busy_s(), time.monotonic()
        got = footprints({name: p.pid for name, p in procs.items()}, ctx.window)
        measured = sum(fp.cpu_percent for fp in got.values())
        rest.append(max(0.0, 100.0 * (machine_busy_s() - busy) / (time.monotonic() - t0) - measured))
        for name, fp in got.items():
            samples[name].append(fp)
        ctx.log(f"footprint: window {w + 1}/{windows}: "
                + ", ".join(f"{n} {fp.cpu_percent:.3f}% {fp.rss_median / MB:.1f} MB" for n, fp in got.items())
                + f"; the rest of the machine {rest[-1]:.1f}%")
    for p in procs.values():
        s.stop(p)
    instances = {base: [samples.pop(f"{base} #{i + 1}") for i in range(INSTANCES)] for base in (DEFAULT, BARE)}
    merged = {base: [median_footprint([run[w] for run in runs]) for w in range(windows)]
              for base, runs in instances.items()}
    others = {n: v for n, v in samples.items() if n != "node-exporter (idle)"}
    samples = {DEFAULT: merged[DEFAULT], **others, BARE: merged[BARE], "node-exporter (idle)": samples["node-exporter (idle)"]}
    starts = startup(ctx, 1 if ctx.quick else ctx.reps)
    stages, heavy = import_costs(str(ROOT))
    rows, data = [], {}
    for name, fps in samples.items():
        data[name] = {"cpu_percent": [f.cpu_percent for f in fps], "rss_bytes": [f.rss_median for f in fps],
                      "rss_max_bytes": [f.rss_max for f in fps], "pss_bytes": [f.pss for f in fps],
                      "uss_bytes": [f.uss for f in fps], "wakeups": [f.wakeups for f in fps]}
    for name, d in data.items():
        vs_cpu = ratios(d["cpu_percent"], data[BARE]["cpu_percent"]).fmt(1, 2, "×")
        vs_rss = ratios(d["rss_bytes"], data[BARE]["rss_bytes"]).fmt(1, 2, "×")
        rows.append([name, Summary.of(d["rss_bytes"]).fmt(1 / MB, 1), f"{max(d['rss_max_bytes']) / MB:.1f}",
                     Summary.of(d["pss_bytes"]).fmt(1 / MB, 1), Summary.of(d["uss_bytes"]).fmt(1 / MB, 1),
                     Summary.of(d["cpu_percent"]).fmt(1, 3), Summary.of(d["wakeups"]).fmt(1, 1), vs_rss, vs_cpu])
    spread = {base: [statistics.median(f.cpu_percent for f in run) for run in runs] for base, runs in instances.items()}
    default = data[DEFAULT]
    rss_med = statistics.median(default["rss_bytes"])
    cpu_ratio = ratios(default["cpu_percent"], data[BARE]["cpu_percent"])
    wake = statistics.median(default["wakeups"])
    live, health = Summary.of([x["live"] for x in starts]), Summary.of([x["health"] for x in starts])
    targets = [
        Target("idle RSS, default config", "<= 45 MB", f"{rss_med / MB:.1f} MB", rss_med <= RSS_TARGET,
               f"{(RSS_TARGET - rss_med) / MB:.1f} MB under" if rss_med <= RSS_TARGET else
               f"{(rss_med - RSS_TARGET) / MB:.1f} MB over: the interpreter and asyncio (the bare process: "
               f"{statistics.median(data[BARE]['rss_bytes']) / MB:.1f} MB), aiohttp and pydantic come to about "
               "that (see Footprint)" + (f"; client libraries loaded without use: {', '.join(heavy)}" if heavy else "")),
        Target("idle CPU, default config, vs a bare asyncio process waking every 100 ms", "<= 1.30×",
               cpu_ratio.fmt(1, 2, "×") + f" ({statistics.median(default['cpu_percent']):.3f}% vs "
               f"{statistics.median(data[BARE]['cpu_percent']):.3f}% of a core)", cpu_ratio.median <= CPU_RATIO_TARGET,
               f"{CPU_RATIO_TARGET - cpu_ratio.median:.2f} under" if cpu_ratio.median <= CPU_RATIO_TARGET else
               f"{cpu_ratio.median - CPU_RATIO_TARGET:.2f} over: {wake:.0f} event-loop wake-ups/s (heartbeat, "
               "state-file poll, check samples; see Footprint)"),
        Target("start-up, default config, to the first /health 200", "reported", health.fmt(1e3, 0, " ms")
               + f" (first /live 200: {live.fmt(1e3, 0, ' ms')})", None,
               "the first 200 waits for `rise` (2) passes of the 2 s memory check, by design: a check starts down"),
    ]
    md = (
        f"{windows} windows of {ctx.window:g} s, all processes sampled over the same windows (CPU: the "
        "nanoseconds every thread spent on a CPU, from /proc/PID/task/*/schedstat, over the window; RSS = VmRSS "
        "from /proc/PID/status once a second; PSS and USS (private pages) from /proc/PID/smaps_rollup at the end "
        "of each window). The agents are probed (/health) but not scraped or asked for /status, except the one "
        "asked for /status once, which makes it load aiohttp (a /metrics scrape would not). The reference is `bench/bare.py`, a bare asyncio process that only wakes every 100 ms "
        "(what the agent's heartbeat does), started beside them; node-exporter is idle (never scraped). "
        f"`{DEFAULT}` and the bare process run as {INSTANCES} processes each and each window takes the median "
        "of their figures (processes of the same program differ by 10 to 20% in idle CPU: "
        + "; ".join(f"{base}: {', '.join(f'{c:.3f}%' for c in cpus)}" for base, cpus in spread.items())
        + ", each a median over the windows). "
        f"`{DEPS}` runs the full example config with none of its dependencies present (every check fails): "
        "every probe module and client library it names is loaded. Median [min–max] over windows; ratios per "
        "window.\n\n"
        + table(["process", "RSS MB", "RSS max MB", "PSS MB", "USS MB", "CPU % of a core", "wake-ups/s",
                 "RSS / bare", "CPU / bare"], rows)
        + "\n\n`wake-ups/s`: context switches of the main thread (the event loop) per second; idle CPU is "
        "mostly their number times the cost of one loop iteration. Meanwhile the rest of the machine (the "
        f"bench, its nginx, Redis and PostgreSQL, the OS) was busy {Summary.of(rest).fmt(1, 1)}% of a core "
        "(/proc/stat): a wake-up costs more while other processes run, the more so the more memory it "
        "touches, so the ratio to the bare process rises with it.\n\n"
        + f"Start-up ({len(starts)} runs, default config): exec to the first /live 200 "
        f"{live.fmt(1e3, 0, ' ms')}, to the first /health 200 {health.fmt(1e3, 0, ' ms')}.\n\n"
        + "Where the memory goes: RSS after each stage of the agent's imports and the default config's load, "
        "in a fresh interpreter (shared libraries included, as in RSS); the last two stages are what the first "
        "request only aiohttp answers (/status, the page, /admin) adds:\n\n"
        + table(["import stage", "RSS added MB"], [[f"`{n}`", f"{b / MB:.1f}"] for n, b in stages])
        + (f"\n\nClient libraries imported at startup although the default config uses none of them: "
           f"{', '.join(heavy)}." if heavy else "")
    )
    return Section("Footprint", md, targets, {"footprint": data, "imports": stages, "heavy_imports": heavy,
                                              "startup": starts, "rest_percent": rest}, plot=lambda ax: plot(ax, data))


def median_footprint(fps: list[Footprint]) -> Footprint:
    """Each figure's median over processes of the same program, measured over the same window."""
    return Footprint(*(statistics.median(getattr(f, name) for f in fps) for name in Footprint.__dataclass_fields__))


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
    ax.set_xticks(list(xs), [n.replace(", ", "\n") for n in names], fontsize=6)
    ax.set_title("Idle footprint (blue RSS, orange CPU), median")

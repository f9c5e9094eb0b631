"""Section 1: serving /health with wrk, healthgate beside nginx and a naive endpoint, interleaved."""

from __future__ import annotations

from collections import defaultdict

from bench.core import Ctx, Section, Target, agent_config, table
from bench.load import paced_latency, wrk
from bench.parse import Summary, WrkResult, percentile, ratios
from bench.servers import http_status, wait_until

SCENARIOS = [(1, False), (50, False), (1, True), (50, True)]  # (connections, Connection: close)
PACED_RATE = 1000.0  # requests/s of the paced 1-connection latency run: a busy load balancer's probing
HG = "healthgate"  # the headline: the default event loop (uvloop when installed)


def label(conns: int, close: bool) -> str:
    return f"{conns} conn, {'close' if close else 'keep-alive'}"


def start(ctx: Ctx) -> dict[str, str]:
    """Every server of the section, each answering /health with 200; name -> URL."""
    s = ctx.servers
    assert ctx.nginx and ctx.redis and ctx.postgres
    procs = {
        "nginx": ctx.nginx,
        HG: s.healthgate(agent_config(), loop="uvloop", name="hg-uvloop"),
        "healthgate asyncio": s.healthgate(agent_config(), loop="asyncio", name="hg-asyncio"),
        "healthgate aiohttp-only": s.healthgate(agent_config(server="fast_health = false"), loop="uvloop",
                                                name="hg-aiohttp"),
        "naive": s.naive(ctx.redis.port, ctx.postgres.port, loop="uvloop"),
    }
    urls = {name: f"http://127.0.0.1:{p.port}/health" for name, p in procs.items()}
    for name, url in urls.items():
        wait_until(lambda url=url: http_status(url) == 200, 60, f"{name} /health 200", procs[name])
    return urls


def run(ctx: Ctx) -> Section:
    urls = start(ctx)
    names = list(urls)
    ctx.log(f"serve: warm-up of {', '.join(names)}")
    for url in urls.values():
        wrk(url, 50, 1)
    results: dict[tuple[int, bool], dict[str, list[WrkResult]]] = defaultdict(lambda: defaultdict(list))
    paced: dict[str, list[list[float]]] = defaultdict(list)  # name -> per repetition, every latency
    for rep in range(ctx.reps):
        for conns, close in SCENARIOS:
            order = names[rep % len(names):] + names[:rep % len(names)]  # rotate: no server always goes first
            for name in order:
                r = wrk(urls[name], conns, ctx.duration, close=close)
                results[(conns, close)][name].append(r)
            ctx.log(f"serve: rep {rep + 1}/{ctx.reps} {label(conns, close)}: "
                    + ", ".join(f"{n} {results[(conns, close)][n][-1].rps:,.0f}/s" for n in names))
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            port = int(urls[name].rsplit(":", 1)[1].split("/")[0])
            paced[name].append(paced_latency(port, PACED_RATE, ctx.duration))
        ctx.log(f"serve: rep {rep + 1}/{ctx.reps} paced 1 conn: "
                + ", ".join(f"{n} p99 {percentile(paced[n][-1], 0.99) * 1e3:.3f} ms" for n in names))
    return report(results, paced, names, ctx)


def report(results, paced, names: list[str], ctx: Ctx) -> Section:
    rows, ratio_rows, data = [], [], {}
    paced_rows = []
    for name in names:
        runs = paced[name]
        paced_rows.append([name, Summary.of([percentile(r, 0.5) for r in runs]).fmt(1e3, 3),
                           Summary.of([percentile(r, 0.99) for r in runs]).fmt(1e3, 3),
                           Summary.of([percentile(r, 0.999) for r in runs]).fmt(1e3, 3),
                           Summary.of([max(r) for r in runs]).fmt(1e3, 2), str(sum(len(r) for r in runs))])
    for conns, close in SCENARIOS:
        by = results[(conns, close)]
        for name in names:
            rs = by[name]
            bad = sum(r.socket_errors + r.non_2xx for r in rs)
            rows.append([label(conns, close), name, Summary.of([r.rps for r in rs]).fmt(digits=0),
                         Summary.of([r.p50 for r in rs]).fmt(1e3, 3), Summary.of([r.p99 for r in rs]).fmt(1e3, 3),
                         str(bad)])
        rps = {n: [r.rps for r in by[n]] for n in names}
        ratio_rows.append([label(conns, close), ratios(rps[HG], rps["nginx"]).fmt(100, 1, "%"),
                           ratios(rps["healthgate asyncio"], rps["nginx"]).fmt(100, 1, "%"),
                           ratios(rps["healthgate aiohttp-only"], rps["nginx"]).fmt(100, 1, "%"),
                           ratios(rps[HG], rps["naive"]).fmt(1, 1, "×")])
        data[label(conns, close)] = {n: {"rps": rps[n], "p50": [r.p50 for r in by[n]],
                                         "p99": [r.p99 for r in by[n]]} for n in names}
    ka50 = results[(50, False)]
    share = ratios([r.rps for r in ka50[HG]], [r.rps for r in ka50["nginx"]])
    p99_1 = Summary.of([percentile(r, 0.99) for r in paced[HG]])
    nginx_p99_1 = Summary.of([percentile(r, 0.99) for r in paced["nginx"]])
    paced_data = {n: {"p50": [percentile(r, 0.5) for r in paced[n]], "p99": [percentile(r, 0.99) for r in paced[n]],
                         "max": [max(r) for r in paced[n]]} for n in names}
    targets = [
        Target("/health keep-alive, 50 connections", ">= 20% of nginx's requests/s", share.fmt(100, 1, "%"),
               share.median >= 0.20,
               "" if share.median >= 0.20 else f"{(0.20 - share.median) * 100:.1f} points short"),
        Target(f"/health keep-alive, 1 connection, paced at {PACED_RATE:g}/s", "p99 < 1 ms",
               p99_1.fmt(1e3, 3, " ms") + f" (nginx: {nginx_p99_1.fmt(1e3, 3, ' ms')})", p99_1.median < 0.001,
               "" if p99_1.median < 0.001 else
               f"{(p99_1.median - 0.001) * 1e3:.2f} ms over; nginx's p99 in the same run shows the machine's floor"),
    ]
    md = (
        f"wrk, 1 thread, {ctx.duration:g} s per run, {ctx.reps} interleaved repetitions (server order rotated "
        "each repetition). Median [min–max] over repetitions. `bad` counts socket errors and non-2xx answers.\n\n"
        + table(["load", "server", "requests/s", "p50 ms", "p99 ms", "bad"], rows)
        + "\n\nRatios of requests/s, taken per repetition (paired runs, adjacent in time), median [min–max]:\n\n"
        + table(["load", "healthgate / nginx", "asyncio loop / nginx", "aiohttp-only / nginx",
                 "healthgate / naive"], ratio_rows)
        + "\n\nwrk's latency percentiles are corrected for coordinated omission (it adds synthetic samples for "
        "every response slower than the mean interval), so at the maximum rate on one connection a single "
        "scheduler hiccup of a few ms becomes a slow 1%. The latency a prober sees is measured apart: one "
        f"keep-alive connection sending GET /health at a steady {PACED_RATE:g}/s for {ctx.duration:g} s "
        "(a Python client timing each request with perf_counter; its own overhead is in every server's "
        "figures alike), interleaved the same way:\n\n"
        + table(["server", "p50 ms", "p99 ms", "p99.9 ms", "max ms", "samples"], paced_rows)
    )
    return Section("Serving /health", md, targets, {"serve": data, "paced": paced_data, "names": names}, plot=lambda ax: plot(ax, data, names))


def plot(ax, data: dict, names: list[str]) -> None:
    import statistics

    loads = list(data)
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        meds = [statistics.median(data[load][name]["rps"]) for load in loads]
        lo = [m - min(data[load][name]["rps"]) for m, load in zip(meds, loads, strict=True)]
        hi = [max(data[load][name]["rps"]) - m for m, load in zip(meds, loads, strict=True)]
        ax.bar([x + i * width for x in range(len(loads))], meds, width, yerr=[lo, hi], label=name, capsize=2)
    ax.set_xticks([x + width * (len(names) - 1) / 2 for x in range(len(loads))], loads, fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("requests/s (log)")
    ax.set_title("/health throughput, median [min–max]")
    ax.legend(fontsize=6)

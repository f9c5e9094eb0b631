"""Section 5: check schedule lag p50/p99, idle and while /health is flooded at the maximum rate."""

from __future__ import annotations

import time

from bench.core import Ctx, Section, Target, agent_config, checks20, table
from bench.load import Flood, histogram
from bench.parse import Summary, histogram_delta, histogram_quantile
from bench.servers import http_status, wait_until

LAG = "healthgate_check_schedule_lag_seconds"


def window(metrics: str, seconds: float, flood_url: str | None) -> dict:
    """Lag quantiles of the samples started during one window, optionally under a wrk flood."""
    before = histogram(metrics, LAG)
    flood = Flood(flood_url, 50, seconds) if flood_url else None
    try:
        if flood is None:
            time.sleep(seconds)
            load = None
        else:
            load = flood.result()
    finally:
        if flood is not None:
            flood.stop()
    delta = histogram_delta(histogram(metrics, LAG), before)
    return {"p50": histogram_quantile(0.5, delta), "p99": histogram_quantile(0.99, delta), "samples": delta[-1][1],
            "rps": load.rps if load else None, "bad": (load.non_2xx + load.socket_errors) if load else 0}


def run(ctx: Ctx) -> Section:
    assert ctx.redis and ctx.nginx
    proc = ctx.servers.healthgate(agent_config(checks20(ctx.redis.port, ctx.nginx.port)), name="hg-lag")
    base = f"http://127.0.0.1:{proc.port}"
    wait_until(lambda: http_status(base + "/health") == 200, 60, "agent up", proc)
    res: dict[str, list[dict]] = {"idle": [], "flood": []}
    for rep in range(ctx.reps):
        for cond in ("idle", "flood"):
            w = window(base + "/metrics", ctx.window, base + "/health" if cond == "flood" else None)
            res[cond].append(w)
            ctx.log(f"lag: rep {rep + 1}/{ctx.reps} {cond}: p50 {w['p50'] * 1e3:.2f} ms p99 {w['p99'] * 1e3:.2f} ms "
                    f"({w['samples']:.0f} samples)" + (f", flood {w['rps']:,.0f}/s" if w["rps"] else ""))
    ctx.servers.stop(proc)
    rows = []
    for cond, ws in res.items():
        rps = Summary.of([w["rps"] for w in ws if w["rps"]])
        rows.append([cond, Summary.of([w["p50"] for w in ws]).fmt(1e3, 2), Summary.of([w["p99"] for w in ws]).fmt(1e3, 2),
                     f"{sum(w['samples'] for w in ws):.0f}", rps.fmt(digits=0) if rps.n else "-",
                     str(sum(w["bad"] for w in ws))])
    p99 = Summary.of([w["p99"] for w in res["flood"]])
    targets = [Target("schedule lag under a /health flood", "p99 < 20 ms", p99.fmt(1e3, 2, " ms"), p99.median < 0.020,
                      "" if p99.median < 0.020 else f"{(p99.median - 0.020) * 1e3:.1f} ms over")]
    md = (
        f"healthgate with 20 checks at 1 s; {ctx.reps} repetitions of an idle window and a flood window of "
        f"{ctx.window:g} s each, interleaved. Flood: wrk, 50 keep-alive connections, as fast as it goes. Lag "
        f"quantiles come from the `{LAG}` histogram scraped before and after each window "
        "(Prometheus' histogram_quantile interpolation on the difference). `bad`: non-2xx answers and socket "
        "errors seen by the flood.\n\n"
        + table(["condition", "lag p50 ms", "lag p99 ms", "samples", "flood requests/s", "bad"], rows)
    )
    return Section("Schedule lag under a flood", md, targets, {"lag": res}, plot=lambda ax: plot(ax, res))


def plot(ax, res: dict) -> None:
    import statistics

    conds = list(res)
    for i, q in enumerate(("p50", "p99")):
        vals = [statistics.median([w[q] for w in res[c]]) * 1e3 for c in conds]
        ax.bar([x + i * 0.4 for x in range(len(conds))], vals, 0.4, label=q)
    ax.axhline(20, color="red", linestyle="--", linewidth=1, label="p99 target")
    ax.set_xticks([x + 0.2 for x in range(len(conds))], conds)
    ax.set_ylabel("schedule lag, ms")
    ax.set_title("Check schedule lag, median of windows")
    ax.legend(fontsize=6)

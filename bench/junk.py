"""Section: how much unauthenticated junk it takes to stall the loop past max_loop_lag (which fails the node
closed: every consumer hears DOWN), and whether a load balancer's probe is still answered meanwhile.

Junk is what no probe sends: a path that does not exist, answered 404 by aiohttp (the slow path; /health
goes through the fast responder). wrk processes, each one thread, flood it from the other core while a
prober asks /health every 50 ms as HAProxy would (a fresh connection each time, 1 s timeout)."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

from bench.core import Ctx, Section, Target, agent_config, table
from bench.load import Flood
from bench.parse import Summary
from bench.servers import http_status, wait_until

# (wrk processes, connections each): up to the listener's cap of 512 connections, then past it.
LEVELS = [(1, 50), (2, 128), (4, 128), (4, 256)]
PROBE_EVERY = 0.05


class Prober(threading.Thread):
    """/health every PROBE_EVERY seconds: each answer's status (0 for none within 1 s) and latency."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url, self.stop = url, threading.Event()
        self.codes: list[int] = []
        self.latencies: list[float] = []

    def run(self) -> None:
        while not self.stop.is_set():
            t0 = time.monotonic()
            try:
                with urllib.request.urlopen(self.url, timeout=1.0) as r:
                    code = r.status
            except urllib.error.HTTPError as e:
                code = e.code
            except OSError:
                code = 0
            self.codes.append(code)
            self.latencies.append(time.monotonic() - t0)
            self.stop.wait(max(0.0, PROBE_EVERY - (time.monotonic() - t0)))


def stalls(log: str, since: int) -> int:
    return sum(1 for line in log.splitlines()[since:] if '"event": "loop_stalled"' in line)


def window(ctx: Ctx, base: str, log_path, procs: int, conns: int) -> dict:
    before = len(log_path.read_text(errors="replace").splitlines())
    prober = Prober(base + "/health")
    prober.start()
    floods = [Flood(base + "/junk", conns, ctx.window) for _ in range(procs)]
    try:
        results = [f.result() for f in floods]
    finally:
        for f in floods:
            f.stop()
        prober.stop.set()
        prober.join(5)
    lat = sorted(prober.latencies)
    up = sum(1 for c in prober.codes if c == 200)
    return {"procs": procs, "conns": conns, "rps": sum(r.rps for r in results),
            "probes": len(prober.codes), "up_share": up / max(1, len(prober.codes)),
            "unanswered": sum(1 for c in prober.codes if c == 0),
            "p99": lat[int(0.99 * (len(lat) - 1))] if lat else float("nan"), "max": lat[-1] if lat else float("nan"),
            "stalls": stalls(log_path.read_text(errors="replace"), before)}


def run(ctx: Ctx) -> Section:
    proc = ctx.servers.healthgate(agent_config(), name="hg-junk")
    base = f"http://127.0.0.1:{proc.port}"
    wait_until(lambda: http_status(base + "/health") == 200, 60, "agent up", proc)
    levels = LEVELS[:2] if ctx.quick else LEVELS
    res: list[dict] = []
    for rep in range(1 if ctx.quick else ctx.reps):
        for procs, conns in levels:
            wait_until(lambda: http_status(base + "/health") == 200, 30, "up again before the next window", proc)
            w = window(ctx, base, proc.log_path, procs, conns)
            res.append(w)
            ctx.log(f"junk: rep {rep + 1} {procs}x{conns}: {w['rps']:,.0f} junk/s, /health 200 "
                    f"{w['up_share']:.1%}, probe p99 {w['p99'] * 1e3:.1f} ms, stalls {w['stalls']}")
    ctx.servers.stop(proc)
    rows = []
    for procs, conns in levels:
        ws = [w for w in res if (w["procs"], w["conns"]) == (procs, conns)]
        rows.append([f"{procs} x {conns}", Summary.of([w["rps"] for w in ws]).fmt(digits=0),
                     Summary.of([w["up_share"] * 100 for w in ws]).fmt(1, 1),
                     str(sum(w["unanswered"] for w in ws)),
                     Summary.of([w["p99"] for w in ws]).fmt(1e3, 1), Summary.of([w["max"] for w in ws]).fmt(1e3, 1),
                     str(sum(w["stalls"] for w in ws))])
    worst = min(res, key=lambda w: (w["up_share"], -w["procs"] * w["conns"]))  # the biggest flood among the worst
    figure = (f"{worst['procs']} x {worst['conns']} connections of junk ({worst['rps']:,.0f} requests/s): "
              f"/health 200 on {worst['up_share']:.1%} of probes, {worst['stalls']} loop stalls")
    targets = [Target("a junk flood: probes answered, no stall past max_loop_lag", "reported", figure, None,
                      "the loop is shared: what the junk costs each iteration is what a probe waits")]
    md = (
        f"The default config; each window {ctx.window:g} s. Junk: `GET /junk` (404 from aiohttp, the slow path) "
        "from wrk processes of one thread each; the listener's cap is 512 connections (`server.max_connections`) "
        "and evicts the oldest idle beyond it. Meanwhile a prober asks `/health` every 50 ms on a fresh "
        "connection with a 1 s timeout. `stalls`: `loop_stalled` events (lag past `max_loop_lag`, which makes "
        "every consumer hear DOWN for `loop_recovery`). Median [min–max] over repetitions.\n\n"
        + table(["wrk x connections", "junk requests/s", "/health 200 %", "unanswered", "probe p99 ms",
                 "probe max ms", "stalls"], rows)
    )
    return Section("A junk flood", md, targets, {"junk": json.loads(json.dumps(res))})

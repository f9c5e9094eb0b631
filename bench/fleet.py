"""Section 7: the fleet guard's store load: simulated groups of 100, 1,000 and 10,000 members on Redis and etcd."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from bench.core import Ctx, Section, Target, table
from bench.parse import percentile, proc_cpu_ticks
from bench.servers import BenchError, Proc

SIZES = (100, 1000, 10_000)
WORKERS = 16  # concurrent client calls: the agents of a group never wait on one another
BURST = 2000  # grant requests timed per group (all of them below this size)
TICK = os.sysconf("SC_CLK_TCK")
MIN_HOLD = 10.0  # the default: how often a held member asks again once its retries have backed off


def cpu_seconds(pid: int) -> float:
    return proc_cpu_ticks(Path(f"/proc/{pid}/stat").read_text()) / TICK


def config(backend: str, port: int, group: str):
    from agent.fleet.config import FleetConfig

    store = f"redis://127.0.0.1:{port}/0" if backend == "redis" else f"etcd://127.0.0.1:{port}"
    # Long ttl: the bench beats each member far less often than once a second, yet every member must stay
    # alive through the windows. The per-member rate is stated at the default heartbeat (1 s) below.
    return FleetConfig(store=store, group=group, node="bench", max_down="30%", heartbeat="10s", ttl="120s",
                       timeout="5s")


class Members:
    """N simulated members of one group; store objects share one connection pool (Redis) or session (etcd)."""

    def __init__(self, backend: str, port: int, n: int):
        self.backend, self.n = backend, n
        self.cfg = config(backend, port, f"bench{n}")
        self.stores: list = []
        self.shared = None
        self.wall = time.time()  # a member's `since` changes only with its status

    async def open(self) -> None:
        if self.backend == "redis":
            import redis.asyncio

            from agent.fleet.redis import RedisStore

            self.shared = redis.asyncio.from_url(self.cfg.store, max_connections=WORKERS, decode_responses=True)
            self.stores = [RedisStore(self.cfg, self.shared) for _ in range(self.n)]
        else:
            import aiohttp

            from agent.fleet.etcd import EtcdStore

            self.shared = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=WORKERS))
            self.stores = [EtcdStore(self.cfg, self.shared) for _ in range(self.n)]
        await self.stores[0].clear()

    async def close(self) -> None:
        if self.backend == "redis":
            await self.shared.aclose()
        else:
            await self.shared.close()

    def calls(self) -> int:
        return sum(s.calls for s in self.stores)

    async def each(self, indices: list[int], op: str, status: str, reasons: tuple[str, ...] = ()) -> list[tuple]:
        """Call `op` for the members at `indices` from WORKERS tasks; (latency, standing) per call."""
        from agent.fleet.store import Report

        out: list[tuple] = []
        queue = list(reversed(indices))
        wall = self.wall

        async def worker() -> None:
            while queue:
                i = queue.pop()
                t0 = time.perf_counter()
                try:
                    standing = await getattr(self.stores[i], op)(Report(f"m{i:05d}", status, reasons, wall))
                except Exception as e:  # noqa: BLE001 - a contended or failed call is a result too
                    standing = e
                out.append((time.perf_counter() - t0, standing))

        await asyncio.gather(*(worker() for _ in range(WORKERS)))
        return out


async def age(m: Members) -> None:
    """Make the group look older than one ttl, so it is past the warm-up in which a new group grants nothing."""
    store = m.stores[0]
    if m.backend == "redis":
        seconds, micros = await store.client.time()
        await store.client.set(store.keys[-1], seconds * 1000 + micros // 1000 - int(m.cfg.ttl * 1000) - 1)
    else:
        from agent.fleet.etcd import _b64

        await store._post("/v3/kv/deleterange", {"key": _b64(f"{store.root}warmup")})  # born stays


async def measure(backend: str, proc: Proc, n: int, seconds: float) -> dict:
    from agent.fleet.budget import allowed_down

    m = Members(backend, proc.port, n)
    await m.open()
    try:
        t0 = time.monotonic()
        await m.each(list(range(n)), "beat", "up")  # every member registers
        populate = time.monotonic() - t0
        await age(m)
        # Steady state: members beat round-robin, as fast as the client can, for `seconds`.
        calls0, cpu0, t0 = m.calls(), cpu_seconds(proc.pid), time.monotonic()
        beats, i = 0, 0
        while time.monotonic() - t0 < seconds:
            batch = [(i + k) % n for k in range(min(n, 500))]
            i += len(batch)
            beats += len(await m.each(batch, "beat", "up"))
        elapsed = time.monotonic() - t0
        beat_calls = (m.calls() - calls0) / beats
        beat_cpu = (cpu_seconds(proc.pid) - cpu0) / beats
        # An outage: every member asks at once (up to BURST of them), none of them beating meanwhile.
        asked = list(range(min(n, BURST)))
        calls0, cpu0 = m.calls(), cpu_seconds(proc.pid)
        t1 = time.monotonic()
        results = await m.each(asked, "acquire", "shed", ("db",))
        burst_s = time.monotonic() - t1
        grant_calls = (m.calls() - calls0) / len(asked)
        grant_cpu = (cpu_seconds(proc.pid) - cpu0) / len(asked)
        latencies = [lat for lat, _ in results]
        errors = sum(1 for _, s in results if isinstance(s, Exception))
        granted = sum(1 for _, s in results if not isinstance(s, Exception) and s.granted)
        budget = allowed_down(m.cfg.rule, n)
        shed_idx = [asked[k] for k, (_, s) in enumerate(results) if not isinstance(s, Exception) and s.granted]
        await m.each(shed_idx, "release", "up")
        return {"members": n, "populate_s": populate, "beats_per_s": beats / elapsed, "beat_calls": beat_calls,
                "beat_cpu_s": beat_cpu, "grant_calls": grant_calls, "grant_cpu_s": grant_cpu, "asked": len(asked),
                "granted": granted, "errors": errors, "budget": budget, "grant_p50": percentile(latencies, 0.5),
                "grant_p99": percentile(latencies, 0.99), "burst_s": burst_s}
    finally:
        await m.close()


def run(ctx: Ctx) -> Section:
    seconds = 1.0 if ctx.quick else 3.0
    results: dict[str, list[dict]] = {}
    notes = []
    for backend in ("redis", "etcd"):
        try:
            proc = ctx.servers.redis() if backend == "redis" else ctx.servers.etcd()
        except BenchError as e:
            notes.append(f"{backend}: not run: {e}")
            continue
        results[backend] = []
        try:
            # etcd's 10,000 takes half a minute to register alone: full runs only.
            for n in (s for s in SIZES if not (ctx.quick and backend == "etcd" and s > 1000)):
                res = asyncio.run(measure(backend, proc, n, seconds))
                results[backend].append(res)
                ctx.log(f"fleet: {backend} {n} members: {res['beats_per_s']:.0f} beats/s, grant p99 "
                        f"{res['grant_p99'] * 1000:.1f} ms, {res['granted']}/{res['asked']} granted "
                        f"(budget {res['budget']})")
        finally:
            ctx.servers.stop(proc)
    rows = []
    over = []
    for backend, rs in results.items():
        for r in rs:
            # At the defaults (heartbeat 1 s, min_hold 10 s): every member beats once a second; during an
            # outage a held member also asks again, backing off to once per min_hold.
            outage_rate = r["beat_calls"] + r["grant_calls"] / MIN_HOLD
            steady_cpu = r["members"] * r["beat_cpu_s"] * 100
            outage_cpu = r["members"] * (r["beat_cpu_s"] + r["grant_cpu_s"] / MIN_HOLD) * 100
            rows.append([backend, f"{r['members']:,}", f"{r['beat_calls']:.2f} / {outage_rate:.2f}",
                         f"{r['beats_per_s']:,.0f}", f"{r['beat_cpu_s'] * 1e6:.0f} / {r['grant_cpu_s'] * 1e6:.0f}",
                         f"{steady_cpu:.1f}% / {outage_cpu:.1f}%",
                         f"{r['grant_p50'] * 1000:.1f} / {r['grant_p99'] * 1000:.1f}",
                         f"{r['granted']} of {r['asked']} (budget {r['budget']})"
                         + (f", {r['errors']} failed" if r["errors"] else ""), f"{r['populate_s']:.1f}"])
            if r["granted"] > r["budget"]:
                over.append(f"{backend} {r['members']}")
    bounded = not over and bool(results)
    targets = [Target("grants in a burst never exceed the budget", "granted <= budget",
                      "all within" if bounded else ("over: " + ", ".join(over) if over else "not run"),
                      bounded if results else None)]
    md = (
        f"One store per backend (redis-server 7, etcd 3.4, on this machine), members simulated in one process "
        f"from {WORKERS} concurrent client tasks. Each group registers (one beat per member), then members beat "
        f"round-robin for {seconds:g} s, then up to {BURST:,} members ask for a grant at once (30% budget) and the "
        "granted ones release. Store CPU is utime+stime of the store's process from /proc/PID/stat over each "
        "phase, divided by the calls made. `store ops / member / s` at the defaults (heartbeat 1 s, "
        "min_hold 10 s): steady = requests per beat; outage = a beat plus a held member's grant request, which "
        "backs off to one per min_hold. `store CPU` multiplies CPU per call by those rates and the group size: "
        "the share of one core the store needs for that group. beats/s is what this client reached (client-bound on a 2-core machine, "
        "not the store's ceiling). Grant latency is per request, under the burst's concurrency.\n\n"
        + table(["store", "members", "store ops / member / s (steady / outage)", "beats/s measured",
                 "store CPU µs per beat / per grant request", "store CPU, % of a core (steady / outage)",
                 "grant latency p50 / p99 ms", "granted in the burst", "register s"], rows)
        + ("\n\n" + "\n".join(notes) if notes else "")
    )
    return Section("Fleet guard store", md, targets, {"fleet": results})

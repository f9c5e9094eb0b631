"""Section 2: dependency queries per 1000 probes, counted at Redis and PostgreSQL, healthgate beside naive."""

from __future__ import annotations

import asyncio
import importlib.util
import socket
import time

from bench.core import Ctx, Section, Target, agent_config, table
from bench.load import Flood
from bench.parse import Summary, parse_redis_info
from bench.servers import http_status, wait_until

SYSTEMS = ("healthgate", "naive")


def missing() -> str | None:
    """Why the section can't run with this agent (the redis and postgres check types are needed)."""
    from agent.probes import PROBES

    if not {"redis", "postgres"} <= set(PROBES):
        return "this agent has no `redis`/`postgres` check types yet"
    if importlib.util.find_spec("asyncpg") is None:
        return "asyncpg is not installed"
    return None


def deps_checks(redis_port: int, pg_port: int, interval: str = "1s") -> str:
    return (f'[[checks]]\nname = "redis"\ntype = "redis"\nhost = "127.0.0.1"\nport = {redis_port}\n'
            f'interval = "{interval}"\ntimeout = "500ms"\n\n'
            f'[[checks]]\nname = "postgres"\ntype = "postgres"\nhost = "127.0.0.1"\nport = {pg_port}\n'
            f'user = "postgres"\ndatabase = "postgres"\ninterval = "{interval}"\ntimeout = "500ms"\n')


class RedisCounter:
    """Commands and connections counted by one Redis (INFO all over one raw connection of our own, so the
    only traffic we add is one INFO per reading, which `read()` takes back out)."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.file = self.sock.makefile("rb")

    def read(self) -> tuple[float, float]:
        self.sock.sendall(b"*2\r\n$4\r\nINFO\r\n$3\r\nall\r\n")
        size = int(self.file.readline()[1:])
        info = parse_redis_info(self.file.read(size + 2).decode())
        calls = sum(v["calls"] for k, v in info.items() if k.startswith("cmdstat_") and isinstance(v, dict))
        return float(calls), float(info["total_connections_received"])

    def close(self) -> None:
        self.file.close()
        self.sock.close()


class PgCounter:
    """Statements run in database `postgres`, from pg_stat_statements (updated as each statement ends).
    We read from database template1, so our own statements are not counted."""

    QUERY = ("SELECT coalesce(sum(s.calls), 0) FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid "
             "WHERE d.datname = 'postgres'")

    def __init__(self, port: int):
        self.port = port
        asyncio.run(self._run("CREATE EXTENSION IF NOT EXISTS pg_stat_statements"))

    async def _run(self, sql: str) -> object:
        import asyncpg

        conn = await asyncpg.connect(host="127.0.0.1", port=self.port, user="postgres", database="template1")
        try:
            return await conn.fetchval(sql)
        finally:
            await conn.close()

    def read(self) -> float:
        return float(asyncio.run(self._run(self.QUERY)))


def window(base: str, redis: RedisCounter, pg: PgCounter, seconds: float, flood: bool) -> dict:
    r0, c0 = redis.read()
    p0 = pg.read()
    t0 = time.monotonic()
    probes = 0
    if flood:
        f = Flood(base + "/health", 50, seconds)
        try:
            res = f.result()
        finally:
            f.stop()
        probes = res.requests
    else:
        time.sleep(seconds)
    elapsed = time.monotonic() - t0
    r1, c1 = redis.read()
    p1 = pg.read()
    # Our own INFO (the first reading) is counted between the readings: take it back out.
    return {"seconds": elapsed, "probes": probes, "redis_commands": r1 - r0 - 1, "redis_connections": c1 - c0,
            "pg_statements": p1 - p0}


def per_1000(idle: dict, flood: dict, key: str) -> float:
    """Dependency work per 1000 probes: the flood window's count less what the idle rate explains."""
    if not flood["probes"]:
        return float("nan")
    extra = flood[key] - idle[key] / idle["seconds"] * flood["seconds"]
    return 1000.0 * extra / flood["probes"]


def run(ctx: Ctx) -> Section:
    why = missing()
    if why:
        return Section("Dependency amplification", f"Not run: {why}.",
                       [Target("dependency queries per probe", "0", "not run", None, why)])
    s = ctx.servers
    deps = {name: (s.redis(), s.postgres()) for name in SYSTEMS}  # each system its own, so counts are its own
    (hr, hp), (nr, npg) = deps["healthgate"], deps["naive"]
    procs = {"healthgate": s.healthgate(agent_config(deps_checks(hr.port, hp.port)), name="hg-deps"),
             "naive": s.naive(nr.port, npg.port)}
    counters = {name: (RedisCounter(r.port), PgCounter(p.port)) for name, (r, p) in deps.items()}
    bases = {name: f"http://127.0.0.1:{p.port}" for name, p in procs.items()}
    for name, base in bases.items():
        wait_until(lambda base=base: http_status(base + "/health") == 200, 60, f"{name} up", procs[name])
    seconds = ctx.window / 2
    res: dict[str, dict[str, list[dict]]] = {n: {"idle": [], "flood": []} for n in SYSTEMS}
    try:
        for rep in range(ctx.reps):
            for name in (SYSTEMS if rep % 2 == 0 else SYSTEMS[::-1]):
                redis, pg = counters[name]
                for cond in ("idle", "flood"):
                    res[name][cond].append(window(bases[name], redis, pg, seconds, cond == "flood"))
                w = res[name]["flood"][-1]
                ctx.log(f"deps: rep {rep + 1}/{ctx.reps} {name}: {w['probes']} probes -> "
                        f"{w['redis_commands']:.0f} Redis commands, {w['pg_statements']:.0f} PostgreSQL statements")
    finally:
        for redis, _ in counters.values():
            redis.close()
    for p in procs.values():
        s.stop(p)
    keys = {"redis_commands": "Redis commands", "redis_connections": "Redis connections",
            "pg_statements": "PostgreSQL statements"}
    rows, per = [], {}
    for name in SYSTEMS:
        pairs = list(zip(res[name]["idle"], res[name]["flood"], strict=True))
        per[name] = {k: [per_1000(i, f, k) for i, f in pairs] for k in keys}
        idle_rate = {k: Summary.of([i[k] / i["seconds"] for i, _ in pairs]) for k in keys}
        rows.append([name] + [Summary.of(per[name][k]).fmt(1, 2) for k in keys]
                    + [f"{idle_rate['redis_commands'].fmt(1, 1)} / {idle_rate['pg_statements'].fmt(1, 1)}",
                       Summary.of([f["probes"] / f["seconds"] for _, f in pairs]).fmt(digits=0)])
    hg = Summary.of([a + b for a, b in zip(per["healthgate"]["redis_commands"], per["healthgate"]["pg_statements"],
                                           strict=True)])
    ok = hg.median < 1.0
    targets = [Target("dependency queries per probe (healthgate)", "0", f"{hg.fmt(1, 2)} per 1000 probes", ok,
                      "" if ok else "probes reach the dependencies")]
    md = (
        f"Each system has its own Redis and PostgreSQL, so every command counted there is its own. "
        f"{ctx.reps} repetitions of an idle window and a flood window ({seconds:g} s each; flood: wrk, 50 "
        "keep-alive connections). Per 1000 probes = (flood count − idle rate × flood time) × 1000 / probes: "
        "what the probes added. Counted at the dependency: Redis `INFO commandstats` (calls, all commands) and "
        "`total_connections_received`; PostgreSQL `pg_stat_statements` calls in the database. healthgate checks "
        "Redis and PostgreSQL every 1 s; naive asks both on every request.\n\n"
        + table(["system", "Redis commands / 1000 probes", "Redis connections / 1000 probes",
                 "PostgreSQL statements / 1000 probes", "idle: Redis cmd/s / PG stmt/s", "probes/s"], rows)
    )
    return Section("Dependency amplification", md, targets, {"deps": res, "per_1000": per})

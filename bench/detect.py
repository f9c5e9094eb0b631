"""Section 3: detection and recovery, from killing a real Redis to /health 503 and HAProxy marking DOWN."""

from __future__ import annotations

import http.client
import importlib.util
import random
import signal
import socket
import time
from pathlib import Path

from bench.core import Ctx, Section, Target, agent_config, table
from bench.parse import Summary, parse_haproxy_stat
from bench.servers import BenchError, Proc, free_port, http_status, port_open, wait_until, which

INTER = "250ms"
TIMEOUT = 10.0  # seconds a trial waits for every signal before giving up on it
TARGET = 0.85  # agent-check detection over HAProxy's own check's, medians, with no tuning

# The signals timed in each trial, in the order of the table: (key, description)
SIGNALS = [
    ("health", f"healthgate /health answers 503 (check: interval {INTER}, timeout 200ms, fall 2; nothing else set)"),
    ("agent", f"HAProxy DOWN through agent-check (agent-inter {INTER}) of that agent"),
    ("agent_nofast", "HAProxy DOWN through agent-check, agent with the quick re-check off (fast_interval = interval)"),
    ("httpchk", f"HAProxy DOWN through httpchk GET /health (inter {INTER}, fall 2, rise 2)"),
    ("native", f"HAProxy DOWN through its own `option redis-check` (inter {INTER}, fall 2, rise 2)"),
]


def missing() -> str | None:
    if importlib.util.find_spec("agent.serving.haproxy_agent") is None:
        return "this agent has no HAProxy agent-check listener (`[agent_check] listen`) yet"
    return None


def check_type() -> str:
    """`redis` (PING over a fresh connection) when the agent has it, else `tcp` (a connect): a killed
    Redis refuses both at once, so detection times compare."""
    from agent.probes import PROBES

    return "redis" if "redis" in PROBES else "tcp"


def redis_check(port: int, fast: bool) -> str:
    """The check as a user writes it: interval, timeout and fall only (`fast`: the defaults do the rest);
    without `fast`, the default re-check after a first failure is turned off."""
    return (f'[[checks]]\nname = "redis"\ntype = "{check_type()}"\nhost = "127.0.0.1"\nport = {port}\n'
            f'interval = "{INTER}"\ntimeout = "200ms"\nfall = 2\n'
            + ("" if fast else f'fast_interval = "{INTER}"\n'))


def tables(agent_port: int) -> str:
    # Flap damping would hold the check down after the third kill in a minute: the bench times raw
    # detection and recovery, so it is off here.
    return f'[agent_check]\nlisten = "127.0.0.1:{agent_port}"\n\n[policy]\nflap_threshold = 0\n'


def haproxy_config(sock: Path, app_port: int, agents: dict[str, int], hg_http: int, redis_port: int) -> str:
    common = f"check inter {INTER} fall 2 rise 2"
    out = [f"""global
    stats socket {sock} mode 600 level admin
defaults
    mode http
    timeout connect 1s
    timeout client 5s
    timeout server 5s
    timeout check 200ms
"""]
    for name, port in agents.items():
        out.append(f"backend be_{name}\n    server s1 127.0.0.1:{app_port} {common} agent-check "
                   f"agent-addr 127.0.0.1 agent-port {port} agent-inter {INTER}\n")
    out.append(f"backend be_httpchk\n    option httpchk GET /health\n    server s1 127.0.0.1:{hg_http} {common}\n")
    out.append(f"backend be_native\n    mode tcp\n    option redis-check\n    server s1 127.0.0.1:{redis_port} {common}\n")
    return "\n".join(out)


class Watch:
    """Reads every signal in one pass: HAProxy's server states from its stats socket, /health by HTTP."""

    def __init__(self, sock: Path, health_port: int, others: tuple[int, ...] = ()):
        self.sock = sock
        self.health_port = health_port
        self.others = others  # more agents whose /health must be up before a trial starts
        self.conn = http.client.HTTPConnection("127.0.0.1", health_port, timeout=2)

    def haproxy(self) -> dict[str, bool]:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(2)
            s.connect(str(self.sock))
            s.sendall(b"show stat\n")
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        states = parse_haproxy_stat(b"".join(chunks).decode())
        return {px.removeprefix("be_"): st for (px, sv), st in states.items() if sv == "s1"}

    def health_up(self) -> bool:
        try:
            self.conn.request("GET", "/health")
            resp = self.conn.getresponse()
            resp.read()
            return resp.status == 200
        except (OSError, http.client.HTTPException):
            self.conn.close()
            self.conn = http.client.HTTPConnection("127.0.0.1", self.health_port, timeout=2)
            return False

    def read(self) -> dict[str, bool]:
        """True = up, for every signal: health, agent, agent_nofast, httpchk, native.

        HAProxy's "UP 1/2" (failing, not yet down) is still up and "DOWN 1/2" still down, as for traffic.
        """
        states = {k: not v.startswith("DOWN") for k, v in self.haproxy().items()}
        return {"health": self.health_up(), **states}

    def steady_up(self, seconds: float = 1.0, timeout: float = 30.0) -> None:
        """Every signal up, and the agents' /health 200, without a break for `seconds`: a trial's start."""
        deadline = time.monotonic() + timeout
        since = None
        while time.monotonic() < deadline:
            now = time.monotonic()
            if all(self.read().values()) and all(http_status(f"http://127.0.0.1:{p}/health") == 200
                                                 for p in self.others):
                since = since or now
                if now - since >= seconds:
                    return
            else:
                since = None
            time.sleep(0.01)
        raise BenchError(f"signals not steadily up within {timeout:g} s: {self.read()}")

    def until(self, want: bool, since: float, timeout: float = TIMEOUT) -> dict[str, float]:
        """Seconds from `since` until each signal first reads `want` (NaN if it never did in time)."""
        seen: dict[str, float] = {}
        deadline = since + timeout
        while len(seen) < len(SIGNALS) and time.monotonic() < deadline:
            now = time.monotonic()
            for key, up in self.read().items():
                if up is want and key not in seen:
                    seen[key] = now - since
            time.sleep(0.002)
        return {key: seen.get(key, float("nan")) for key, _ in SIGNALS}


def run(ctx: Ctx) -> Section:
    why = missing()
    if why:
        return Section("Detection and recovery", f"Not run: {why}.",
                       [Target("detection through agent-check", "median <= 750 ms, max 1 s", "not run", None, why)])
    assert ctx.nginx is not None
    s = ctx.servers
    redis = s.redis()
    port = redis.port
    agents = {"agent": free_port(), "agent_nofast": free_port()}
    hg = s.healthgate(agent_config(redis_check(port, True), tables=tables(agents["agent"])), name="hg-detect")
    hg_nofast = s.healthgate(agent_config(redis_check(port, False), tables=tables(agents["agent_nofast"])),
                             name="hg-detect-nofast")
    sock = s.dir / "haproxy.sock"
    cfg = s.dir / "haproxy.cfg"
    cfg.write_text(haproxy_config(sock, ctx.nginx.port, agents, hg.port, port))
    haproxy = Proc("haproxy", [which("haproxy", "haproxy"), "-db", "-f", str(cfg)], s.dir, 0)
    s.procs.append(haproxy)
    wait_until(lambda: sock.exists(), 30, "haproxy stats socket", haproxy)
    watch = Watch(sock, hg.port, (hg_nofast.port,))
    trials = 3 if ctx.quick else max(20, ctx.reps)
    down: list[dict[str, float]] = []
    up: list[dict[str, float]] = []
    try:
        for i in range(trials):
            watch.steady_up()
            time.sleep(random.uniform(0, 0.25))  # a random phase against every check schedule
            t0 = time.monotonic()
            s.stop(redis, signal.SIGKILL)
            down.append(watch.until(False, t0))
            redis = s.redis(port=port, wait=False)
            while not port_open(port):
                if time.monotonic() - t0 > 30:
                    raise BenchError("redis did not come back")
                time.sleep(0.001)
            t1 = time.monotonic()
            up.append(watch.until(True, t1))
            ctx.log(f"detect: trial {i + 1}/{trials}: down " + ", ".join(f"{k} {v * 1e3:.0f}" for k, v in down[-1].items())
                    + " ms; up " + ", ".join(f"{k} {v * 1e3:.0f}" for k, v in up[-1].items()) + " ms")
    finally:
        s.stop(haproxy)
    for p in (hg, hg_nofast):
        s.stop(p)
    return report(down, up, trials)


def report(down: list[dict[str, float]], up: list[dict[str, float]], trials: int) -> Section:
    rows, data = [], {}
    for key, what in SIGNALS:
        d = Summary.of([t[key] for t in down])
        u = Summary.of([t[key] for t in up])
        missed = sum(1 for t in down if t[key] != t[key]) + sum(1 for t in up if t[key] != t[key])
        rows.append([what, f"{d.median * 1e3:.0f}", f"{d.hi * 1e3:.0f}", f"{u.median * 1e3:.0f}",
                     f"{u.hi * 1e3:.0f}", str(missed)])
        data[key] = {"down": [t[key] for t in down], "up": [t[key] for t in up]}
    agent, native = Summary.of(data["agent"]["down"]), Summary.of(data["native"]["down"])
    ratio = agent.median / native.median if native.median else float("nan")
    targets = [
        Target("detection through agent-check (inter 250 ms, fall 2, agent-inter 250 ms)", "median <= 750 ms",
               f"{agent.median * 1e3:.0f} ms", agent.median <= 0.75,
               "" if agent.median <= 0.75 else f"{(agent.median - 0.75) * 1e3:.0f} ms over"),
        Target("detection through agent-check, worst trial", "max <= 1 s", f"{agent.hi * 1e3:.0f} ms",
               agent.hi <= 1.0, "" if agent.hi <= 1.0 else f"{(agent.hi - 1.0) * 1e3:.0f} ms over"),
        Target("detection of a killed Redis through agent-check (no tuning) vs HAProxy's own redis-check, "
               "inter 250 ms fall 2", f"<= {TARGET}× (medians)",
               f"{ratio:.2f}× ({agent.median * 1e3:.0f} ms vs {native.median * 1e3:.0f} ms)" if native.median else "n/a",
               ratio <= TARGET if native.median else None,
               (f"{TARGET - ratio:.2f} under" if ratio <= TARGET else
                f"{ratio - TARGET:.2f} over: the agent-check poll adds up to agent-inter") if native.median else ""),
    ]
    md = (
        f"healthgate watches Redis with a `{check_type()}` check that sets only interval {INTER}, timeout 200ms "
        "and fall 2. Two defaults make it quick: the connection of a passing sample is held until the next, "
        "so Redis dying closes it and the check samples at once; the re-check after a first failure "
        "(interval/5, here 50 ms) confirms it. "
        f"{trials} trials. Each: wait until every signal has been up for 1 s, wait a random 0–250 ms, SIGKILL "
        "Redis, time each "
        "signal until it reads down; restart Redis on the same port and time each signal from the moment Redis "
        "accepts connections until it reads up again. Signals are polled every ~2 ms (HAProxy's stats socket "
        "`show stat`, and /health). Flap damping is off in these agents (it would hold the check down after the "
        "third kill in a minute, by design). `missed`: trials where a signal did not change within "
        f"{TIMEOUT:g} s.\n\n"
        + table(["signal", "down: median ms", "down: max ms", "up: median ms", "up: max ms", "missed"], rows)
    )
    return Section("Detection and recovery", md, targets, {"detect": data}, plot=lambda ax: plot(ax, data))


def plot(ax, data: dict) -> None:
    keys = list(data)
    meds = [Summary.of(data[k]["down"]).median * 1e3 for k in keys]
    maxs = [Summary.of(data[k]["down"]).hi * 1e3 for k in keys]
    ax.bar(range(len(keys)), meds, 0.6, label="median")
    ax.scatter(range(len(keys)), maxs, color="black", marker="_", s=200, label="max", zorder=3)
    ax.axhline(750, color="red", linestyle="--", linewidth=1, label="agent-check median target")
    ax.set_xticks(range(len(keys)), keys, fontsize=7)
    ax.set_ylabel("ms from Redis killed to DOWN")
    ax.set_title("Detection: median and max over trials")
    ax.legend(fontsize=6)

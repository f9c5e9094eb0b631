"""Section: scale. 10 to 2,000 tcp checks at 1 s against one local listener: CPU per sample, RSS, lags."""

from __future__ import annotations

import socket
import statistics
import threading
import time

from bench.core import Ctx, Section, Target, agent_config, table
from bench.load import cpu_ns, histogram, rss
from bench.parse import Summary, histogram_delta, histogram_quantile, parse_content_length, percentile
from bench.servers import BenchError, http_status, wait_until

LAG = "healthgate_check_schedule_lag_seconds"
COUNTS = (10, 100, 1000, 2000)
CPU_TARGET = 40.0  # % of one core at 1,000 checks
PER_SAMPLE_TARGET = 1.3  # CPU per sample at 1,000 checks over that at 100
MB = 1024 * 1024


def tcp_checks(n: int, port: int) -> str:
    return "\n".join(f'[[checks]]\nname = "tcp{i}"\ntype = "tcp"\nhost = "127.0.0.1"\nport = {port}\n'
                     'interval = "1s"\ntimeout = "500ms"\n' for i in range(n))


class Prober(threading.Thread):
    """GET /health at a steady 20/s on one keep-alive connection: each answer's latency and status."""

    def __init__(self, port: int, rate: float = 20.0):
        super().__init__(daemon=True)
        self.port, self.period = port, 1.0 / rate
        self.latencies: list[float] = []
        self.codes: list[int] = []
        self.stop = threading.Event()

    def run(self) -> None:
        request = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            due = time.perf_counter()
            while not self.stop.is_set():
                while (left := due - time.perf_counter()) > 0:
                    time.sleep(left)
                t0 = time.perf_counter()
                sock.sendall(request)
                buf = b""
                while b"\r\n\r\n" not in buf or len(buf.partition(b"\r\n\r\n")[2]) < parse_content_length(
                        buf.partition(b"\r\n\r\n")[0]):
                    chunk = sock.recv(4096)
                    if not chunk:
                        return
                    buf += chunk
                self.latencies.append(time.perf_counter() - t0)
                self.codes.append(int(buf.split(b" ", 2)[1]))
                due += self.period


def window(port: int, pid: int, seconds: float) -> dict:
    metrics = f"http://127.0.0.1:{port}/metrics"
    before = histogram(metrics, LAG)
    prober = Prober(port)
    c0, t0 = cpu_ns(pid), time.monotonic()
    prober.start()
    rss_samples = []
    while time.monotonic() - t0 < seconds:
        rss_samples.append(rss(pid))
        time.sleep(1.0)
    prober.stop.set()
    prober.join(5)
    cpu = (cpu_ns(pid) - c0) / 1e9
    elapsed = time.monotonic() - t0
    delta = histogram_delta(histogram(metrics, LAG), before)
    samples = delta[-1][1]
    return {"cpu_percent": 100 * cpu / elapsed, "cpu_per_sample_us": 1e6 * cpu / samples if samples else float("nan"),
            "samples_per_s": samples / elapsed, "rss_bytes": statistics.median(rss_samples),
            "lag_p99": histogram_quantile(0.99, delta), "health_p99": percentile(prober.latencies, 0.99),
            "up_fraction": (sum(c == 200 for c in prober.codes) / len(prober.codes)) if prober.codes else 0.0}


def run(ctx: Ctx) -> Section:
    assert ctx.nginx is not None
    seconds = ctx.window / 2
    res: dict[int, list[dict]] = {}
    startup: dict[int, float] = {}
    for n in COUNTS:
        t0 = time.monotonic()
        proc = ctx.servers.healthgate(agent_config(tcp_checks(n, ctx.nginx.port)), name=f"hg-scale{n}")
        try:
            wait_until(lambda p=proc: http_status(f"http://127.0.0.1:{p.port}/health") == 200, 120,
                       f"{n} checks up", proc)
        except BenchError as e:
            ctx.log(f"scale: {n} checks never UP: {e}")
            res[n] = []
            ctx.servers.stop(proc)
            continue
        startup[n] = time.monotonic() - t0
        time.sleep(2)
        res[n] = []
        for rep in range(ctx.reps):
            w = window(proc.port, proc.pid, seconds)
            res[n].append(w)
            ctx.log(f"scale: {n} checks, window {rep + 1}/{ctx.reps}: {w['cpu_percent']:.1f}% of a core, "
                    f"{w['cpu_per_sample_us']:.0f} us/sample, {w['samples_per_s']:.0f} samples/s, lag p99 "
                    f"{w['lag_p99'] * 1e3:.1f} ms, /health p99 {w['health_p99'] * 1e3:.2f} ms, up {w['up_fraction']:.0%}")
        ctx.servers.stop(proc)
    rows = []
    for n, ws in res.items():
        if not ws:
            rows.append([f"{n:,}", "never UP", "", "", "", "", "", "", ""])
            continue
        rows.append([f"{n:,}", Summary.of([w["cpu_percent"] for w in ws]).fmt(1, 1),
                     Summary.of([w["cpu_per_sample_us"] for w in ws]).fmt(1, 0),
                     Summary.of([w["samples_per_s"] for w in ws]).fmt(1, 0),
                     Summary.of([w["rss_bytes"] for w in ws]).fmt(1 / MB, 1),
                     Summary.of([w["lag_p99"] for w in ws]).fmt(1e3, 1),
                     Summary.of([w["health_p99"] for w in ws]).fmt(1e3, 2),
                     f"{min(w['up_fraction'] for w in ws):.1%}", f"{startup[n]:.1f}"])

    def med(n: int, key: str) -> float:
        return statistics.median(w[key] for w in res[n]) if res.get(n) else float("nan")

    up1000 = bool(res.get(1000)) and min(w["up_fraction"] for w in res[1000]) == 1.0
    cpu1000 = med(1000, "cpu_percent")
    ratio = med(1000, "cpu_per_sample_us") / med(100, "cpu_per_sample_us")
    ok_cpu = up1000 and cpu1000 <= CPU_TARGET
    targets = [
        Target("1,000 tcp checks at 1 s: UP and steady", f"UP throughout, <= {CPU_TARGET:g}% of one core",
               f"{'UP' if up1000 else 'not steadily UP'}, {cpu1000:.1f}%", ok_cpu,
               f"{CPU_TARGET - cpu1000:.1f} points under" if ok_cpu else
               ("not UP in every /health answer" if not up1000 else f"{cpu1000 - CPU_TARGET:.1f} points over")),
        Target("CPU per sample, 1,000 checks vs 100", f"<= {PER_SAMPLE_TARGET}×", f"{ratio:.2f}×",
               ratio <= PER_SAMPLE_TARGET if ratio == ratio else None,
               (f"{PER_SAMPLE_TARGET - ratio:.2f} under" if ratio <= PER_SAMPLE_TARGET else
                f"{ratio - PER_SAMPLE_TARGET:.2f} over") if ratio == ratio else "not measured"),
    ]
    md = (
        f"One agent at a time with N tcp checks, each every 1 s (timeout 500 ms), all connecting to one local "
        f"listener (the bench's nginx). Once /health is 200 (`up after s`: from exec), {ctx.reps} windows of "
        f"{seconds:g} s: CPU from /proc/PID/task/*/schedstat over the window, divided by the samples started in "
        f"it (the `{LAG}` histogram's count, scraped before and after) for CPU per sample; schedule lag p99 from "
        "that histogram; /health p99 and the share of 200 answers from a client sending GET /health 20 times a "
        "second on one keep-alive connection during the window. Median [min–max] over windows.\n\n"
        + table(["checks", "CPU % of a core", "CPU µs per sample", "samples/s", "RSS MB", "schedule lag p99 ms",
                 "/health p99 ms", "/health 200 (worst window)", "up after s"], rows)
    )
    return Section("Scale", md, targets, {"scale": {str(n): ws for n, ws in res.items()}, "startup": startup},
                   plot=lambda ax: plot(ax, res))


def plot(ax, res: dict) -> None:
    ns = [n for n in res if res[n]]
    ax.plot(ns, [statistics.median(w["cpu_per_sample_us"] for w in res[n]) for n in ns], marker="o")
    ax.set_xscale("log")
    ax.set_xlabel("tcp checks at 1 s")
    ax.set_ylabel("CPU µs per sample")
    ax.set_title("Scale: CPU per sample, median of windows")

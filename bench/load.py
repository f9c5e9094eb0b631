"""Load and sampling against live processes: wrk runs, /proc footprints, metrics scrapes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

from bench.parse import (
    WrkResult,
    parse_content_length,
    parse_histogram,
    parse_wrk,
    proc_cpu_ticks,
    proc_ctxt_switches,
    proc_rss_bytes,
    proc_smaps_rollup,
)
from bench.servers import BenchError, http_text, which

CLK_TCK = os.sysconf("SC_CLK_TCK")


def wrk(url: str, connections: int, duration: float, close: bool = False, threads: int = 1) -> WrkResult:
    """One bounded wrk run (`-d`), latency percentiles on. `close` sends `Connection: close` on every request."""
    argv = [which("wrk", "wrk"), f"-t{threads}", f"-c{connections}", f"-d{max(1, round(duration))}s", "--latency",
            "--timeout", "2s"]
    if close:
        argv += ["-H", "Connection: close"]
    out = subprocess.run([*argv, url], capture_output=True, text=True, timeout=duration + 30)
    if out.returncode:
        raise BenchError(f"wrk failed ({out.returncode}): {out.stderr or out.stdout}")
    return parse_wrk(out.stdout)


def paced_latency(port: int, rate: float, duration: float, path: str = "/health") -> list[float]:
    """True latency of each request on one keep-alive connection, sent at a steady `rate` per second.

    wrk measures at the maximum rate and then corrects for coordinated omission: one stall of a few ms
    becomes a hundred synthetic slow samples, so its 1-connection p99 mostly shows scheduler hiccups. A
    load balancer probes at a modest steady rate; this is what each of those probes waits (client time
    included, the same for every server).
    """
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
    out: list[float] = []
    with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        period = 1.0 / rate
        start = time.perf_counter()
        due = start
        while due - start < duration:
            while (left := due - time.perf_counter()) > 0:
                time.sleep(left)
            t0 = time.perf_counter()
            sock.sendall(request)
            buf = b""
            while b"\r\n\r\n" not in buf:
                chunk = sock.recv(4096)
                if not chunk:
                    raise BenchError("server closed the keep-alive connection")
                buf += chunk
            head, _, body = buf.partition(b"\r\n\r\n")
            need = parse_content_length(head) - len(body)
            while need > 0:
                chunk = sock.recv(need)
                if not chunk:
                    raise BenchError("server closed the connection mid-body")
                need -= len(chunk)
            out.append(time.perf_counter() - t0)
            due += period
    return out


class Flood:
    """wrk in the background for `duration` seconds; `result()` waits for it and parses its report."""

    def __init__(self, url: str, connections: int, duration: float):
        argv = [which("wrk", "wrk"), "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s", "--latency",
                "--timeout", "2s", url]
        self.duration = duration
        self.popen = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def result(self) -> WrkResult:
        try:
            out, _ = self.popen.communicate(timeout=self.duration + 30)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            raise BenchError("wrk did not finish") from None
        return parse_wrk(out)

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(5)


@dataclass(frozen=True)
class Footprint:
    cpu_percent: float  # of one core, over the window
    rss_median: float  # bytes
    rss_max: float
    pss: float  # at the end of the window: RSS with shared pages divided among their users
    uss: float  # private pages only: what ending the process would give back
    wakeups: float  # per second: context switches of the main thread (for the agent, its event loop)


def cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return proc_cpu_ticks(f.read())


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return proc_rss_bytes(f.read())


def switches(pid: int) -> int:
    with open(f"/proc/{pid}/task/{pid}/status") as f:
        return proc_ctxt_switches(f.read())


def smaps(pid: int) -> dict[str, int]:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        return proc_smaps_rollup(f.read())


def thread_ns(pid: int) -> dict[str, int]:
    """Nanoseconds on a CPU of each thread of `pid` (schedstat): clock ticks are 10 ms, too coarse for an
    idle process that uses a few ms a second."""
    out = {}
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                out[task] = int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass  # a thread that ended meanwhile
    return out


def cpu_ns(pid: int) -> int:
    """Nanoseconds on a CPU of the threads of `pid` alive now."""
    return sum(thread_ns(pid).values())


def machine_busy_s() -> float:
    """CPU seconds every core of the machine has spent busy (not idle, not waiting on I/O) since boot."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def footprints(pids: dict[str, int], window: float, every: float = 1.0) -> dict[str, Footprint]:
    """CPU% of a core and RSS of several processes over the same window, read from /proc.

    CPU is counted per thread, read at every RSS sample: a thread that ends in the window (a worker
    retired, the thread that loaded aiohttp) keeps what it used up to its last reading, instead of taking
    its whole life's CPU out of a sum taken at the two ends (which once made a window negative)."""
    start = {name: thread_ns(pid) for name, pid in pids.items()}
    last = {name: dict(threads) for name, threads in start.items()}
    sw = {name: switches(pid) for name, pid in pids.items()}
    t0 = time.monotonic()
    samples: dict[str, list[int]] = {name: [] for name in pids}
    while True:
        for name, pid in pids.items():
            samples[name].append(rss(pid))
            last[name].update(thread_ns(pid))
        left = t0 + window - time.monotonic()
        if left <= 0:
            break
        time.sleep(min(every, left))
    elapsed = time.monotonic() - t0
    out = {}
    for name, pid in pids.items():
        last[name].update(thread_ns(pid))
        before = start[name]
        # A thread id used again by a new thread in the window counts from zero.
        used = sum(ns - before.get(tid, 0) if ns >= before.get(tid, 0) else ns for tid, ns in last[name].items()) / 1e9
        vals = sorted(samples[name])
        roll = smaps(pid)
        out[name] = Footprint(100.0 * used / elapsed, float(vals[len(vals) // 2]), float(vals[-1]),
                              float(roll["Pss"]), float(roll["Private_Clean"] + roll["Private_Dirty"]),
                              (switches(pid) - sw[name]) / elapsed)
    return out


IMPORT_STAGES = ["asyncio", "uvloop", "pydantic", "prometheus_client", "agent.config", "agent.app",
                 "(the default config)", "aiohttp.web", "agent.serving.http_api"]  # the last two: the first /status
HEAVY = ["redis", "asyncpg", "dns", "cryptography", "psutil"]
_STAGES_SCRIPT = """
import importlib, re, sys
def rss():
    return int(re.search(r"VmRSS:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024
print("python", rss())
for m in sys.argv[1].split(","):
    if m == "(the default config)":
        from agent.config import load_config
        load_config("config/healthgate.toml")
        print(m.replace(" ", "_"), rss())
        continue
    try:
        importlib.import_module(m)
    except ImportError:
        continue
    print(m, rss())
print("heavy", ",".join(h for h in sys.argv[2].split(",") if h in sys.modules))
"""


def import_costs(root: str) -> tuple[list[tuple[str, float]], list[str]]:
    """RSS added by each stage of the agent's imports, in a fresh interpreter; and which heavy client
    libraries the agent imports at startup."""
    out = subprocess.run([sys.executable, "-c", _STAGES_SCRIPT, ",".join(IMPORT_STAGES), ",".join(HEAVY)],
                         capture_output=True, text=True, timeout=120, cwd=root)
    stages, heavy, prev = [], [], 0.0
    for line in out.stdout.splitlines():
        name, _, value = line.partition(" ")
        if name == "heavy":
            heavy = [h for h in value.split(",") if h]
            continue
        stages.append((name.replace("_", " ") if name.startswith("(") else name, float(value) - prev))
        prev = float(value)
    return stages, heavy


def histogram(url: str, name: str) -> list[tuple[float, float]]:
    return parse_histogram(http_text(url), name)

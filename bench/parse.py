"""Pure parsers and statistics: wrk output, Prometheus histograms, /proc files, medians with min and max."""

from __future__ import annotations

import math
import re
import statistics
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

TIME_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_TIME = r"([\d.]+)(us|ms|s|m|h)"


@dataclass(frozen=True)
class WrkResult:
    """One wrk run: throughput, latency percentiles in seconds, and everything that was not a clean answer."""

    rps: float
    p50: float
    p99: float
    requests: int
    duration: float
    socket_errors: int = 0
    non_2xx: int = 0
    latency: dict[int, float] = field(default_factory=dict)  # percentile -> seconds


def seconds(value: str, unit: str) -> float:
    return float(value) * TIME_UNITS[unit]


def parse_wrk(text: str) -> WrkResult:
    """Parse `wrk --latency` output. Raises ValueError when the output is not a finished wrk run."""
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", text, re.M)
    total = re.search(r"^\s*(\d+) requests in " + _TIME, text, re.M)
    latency = {int(p): seconds(v, u) for p, v, u in
               re.findall(r"^\s+(50|75|90|99)(?:\.0+)?%\s+" + _TIME + r"\s*$", text, re.M)}
    if not rps or not total or 50 not in latency or 99 not in latency:
        raise ValueError(f"not a finished `wrk --latency` run:\n{text[-1500:]}")
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    return WrkResult(
        rps=float(rps.group(1)), p50=latency[50], p99=latency[99], requests=int(total.group(1)),
        duration=seconds(total.group(2), total.group(3)),
        socket_errors=sum(int(g) for g in errors.groups()) if errors else 0,
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0, latency=latency,
    )


# -- Prometheus histograms ---------------------------------------------------------------------------------

def parse_histogram(text: str, name: str) -> list[tuple[float, float]]:
    """The cumulative buckets [(le, count)] of an unlabelled histogram `name` in exposition text."""
    for family in text_string_to_metric_families(text):
        if family.name == name and family.type == "histogram":
            buckets = [(float(s.labels["le"]), s.value) for s in family.samples if s.name == name + "_bucket"]
            return sorted(buckets)
    raise ValueError(f"histogram {name} not found")


def histogram_delta(after: list[tuple[float, float]], before: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """What was observed between two scrapes of the same histogram."""
    if [le for le, _ in after] != [le for le, _ in before]:
        raise ValueError("histogram buckets changed between scrapes")
    return [(le, a - b) for (le, a), (_, b) in zip(after, before, strict=True)]


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """Prometheus' histogram_quantile on cumulative buckets: linear within a bucket; NaN when empty.

    A rank in the +Inf bucket answers the highest finite bound, as Prometheus does.
    """
    if not buckets or buckets[-1][1] <= 0:
        return math.nan
    total = buckets[-1][1]
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if math.isinf(le):
                return lower_bound
            if count == lower_count:
                return le
            return lower_bound + (le - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = le, count
    return lower_bound


# -- /proc ---------------------------------------------------------------------------------------------

def proc_cpu_ticks(stat: str) -> int:
    """utime + stime (clock ticks, every thread) from the text of /proc/PID/stat."""
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5); fields[0] is field 3


def proc_rss_bytes(status: str) -> int:
    """VmRSS from the text of /proc/PID/status, in bytes."""
    m = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
    if not m:
        raise ValueError("no VmRSS in status (a zombie?)")
    return int(m.group(1)) * 1024


def proc_ctxt_switches(status: str) -> int:
    """Voluntary + involuntary context switches from a /proc/.../status text: how often the thread slept."""
    return sum(int(n) for n in re.findall(r"^(?:non)?voluntary_ctxt_switches:\s+(\d+)", status, re.M))


def proc_smaps_rollup(text: str) -> dict[str, int]:
    """/proc/PID/smaps_rollup as {field: bytes}: Rss, Pss, Private_Clean, Private_Dirty..."""
    return {m.group(1): int(m.group(2)) * 1024 for m in re.finditer(r"^(\w+):\s+(\d+) kB", text, re.M)}


def _number(v: str) -> float | str:
    try:
        return float(v)
    except ValueError:
        return v


def parse_redis_info(text: str) -> dict[str, object]:
    """Redis INFO text: `key:value` lines; `a=1,b=2` values (cmdstat_*, db0) become dicts of numbers."""
    out: dict[str, object] = {}
    for line in text.splitlines():
        if not line or line.startswith("#") or ":" not in line:
            continue
        key, _, value = line.partition(":")
        if "=" in value and key.startswith(("cmdstat_", "db", "errorstat_", "latency_percentiles_usec_")):
            out[key] = {k: _number(v) for k, _, v in (p.partition("=") for p in value.split(","))}
        else:
            out[key] = _number(value)
    return out


def parse_haproxy_stat(text: str) -> dict[tuple[str, str], str]:
    """HAProxy's `show stat` CSV as {(proxy, server): status} ("UP", "DOWN", "UP 1/2", "no check"...)."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines or not lines[0].startswith("# "):
        raise ValueError("not `show stat` output")
    header = lines[0][2:].split(",")
    px, sv, st = header.index("pxname"), header.index("svname"), header.index("status")
    out = {}
    for line in lines[1:]:
        cols = line.split(",")
        if len(cols) > st:
            out[(cols[px], cols[sv])] = cols[st]
    return out


# -- statistics ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Summary:
    """A median with the min and max of the repetitions it summarises."""

    median: float
    lo: float
    hi: float
    n: int

    @classmethod
    def of(cls, values: list[float]) -> Summary:
        vals = [v for v in values if not math.isnan(v)]
        if not vals:
            return cls(math.nan, math.nan, math.nan, 0)
        return cls(statistics.median(vals), min(vals), max(vals), len(vals))

    def fmt(self, scale: float = 1.0, digits: int = 1, unit: str = "") -> str:
        if self.n == 0:
            return "n/a"
        # + 0.0 and the rounding keep a tiny negative (noise around zero) from printing as "-0.00"
        m, lo, hi = (f"{round(v * scale, digits) + 0.0:,.{digits}f}" for v in (self.median, self.lo, self.hi))
        return f"{m}{unit} [{lo}–{hi}]" if self.n > 1 else f"{m}{unit}"


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..1) of raw samples; NaN when there are none."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def parse_content_length(head: bytes) -> int:
    """Content-Length of a response head (0 when absent)."""
    m = re.search(rb"\r\ncontent-length:[ \t]*(\d+)", head, re.I)
    return int(m.group(1)) if m else 0


def ratios(num: list[float], den: list[float]) -> Summary:
    """Per-repetition ratios of paired measurements (same repetition, adjacent in time), summarised."""
    return Summary.of([a / b for a, b in zip(num, den, strict=True) if b])

"""A probe flood: wrk hammers /health for 10 s while a dependency dies in the middle of it."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import aiohttp
import pytest

from tests.faulty import TcpDependency
from tests.helpers import AgentProcess, agent_toml, memory_check, require, scrape, toml_table, wait_for

FLOOD = 10.0
INTERVAL, TIMEOUT, FALL, JITTER = 0.2, 0.1, 2, 0.1
DOWN_BOUND = FALL * INTERVAL * (1 + JITTER) + TIMEOUT  # docs/failure-modes.md's formula
MARGIN = 0.5

def config(port: int) -> str:
    db = toml_table("[[checks]]", name="db", type="tcp", port=port, interval=INTERVAL, timeout=TIMEOUT, fall=FALL,
                    rise=2, jitter=JITTER)
    # Busy schedules that feed the schedule-lag histogram (50 samples a second).
    busy = "".join(memory_check(f"mem{i}", interval="100ms", timeout="50ms", critical=False) for i in range(5))
    return agent_toml() + db + busy

COUNT_STATUSES = """
local threads = {}
counts = {}
function setup(thread) table.insert(threads, thread) end
function response(status, headers, body) counts[status] = (counts[status] or 0) + 1 end
function done(summary, latency, requests)
  local total = {}
  for _, t in ipairs(threads) do
    for k, v in pairs(t:get("counts")) do total[k] = (total[k] or 0) + v end
  end
  io.write("STATUS")
  for k, v in pairs(total) do io.write(string.format(" %d=%d", k, v)) end
  local e = summary.errors
  io.write(string.format("\\nERRORS connect=%d read=%d write=%d timeout=%d\\n", e.connect, e.read, e.write, e.timeout))
  io.write(string.format("REQUESTS %d\\n", summary.requests))
end
"""


def lag_histogram(metrics: dict[str, float]) -> dict[float, float]:
    out = {}
    for series, value in metrics.items():
        m = re.fullmatch(r'healthgate_check_schedule_lag_seconds_bucket\{le="([^"]+)"\}', series)
        if m:
            out[float(m.group(1))] = value
    return out


def quantile(hist: dict[float, float], q: float) -> float:
    """The smallest bucket bound below which a fraction q of the samples lie (an upper bound on the quantile)."""
    total = hist[float("inf")]
    return next(le for le, n in sorted(hist.items()) if n >= q * total)


async def flip_time(url: str, dep: TcpDependency, codes: list[int]) -> float:
    """Kill the dependency; seconds until /health first answers 503, polling every 20 ms."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as s:
        killed = time.monotonic()
        await dep.kill()
        while time.monotonic() - killed < 10:
            async with s.get(url + "/health") as r:
                codes.append(r.status)
                if r.status == 503:
                    return time.monotonic() - killed
            await asyncio.sleep(0.02)
    raise AssertionError("/health never turned 503")


async def wait_status(url: str, code: int, timeout: float = 10) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as s:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            async with s.get(url + "/health") as r:
                if r.status == code:
                    return
            await asyncio.sleep(0.02)
    raise AssertionError(f"/health never answered {code}")


@pytest.mark.e2e  # wrk, a real external program, as the marker says
async def test_probe_flood_does_not_delay_the_verdict(tmp_path: Path) -> None:
    """Under 10 s of /health as fast as wrk can send, a dependency killed mid-flood flips /health to 503
    within the idle bound, check schedule lag stays under 100 ms at p99, and every answer is 200 or 503."""
    wrk = require("wrk", "wrk")
    dep = await TcpDependency().start()
    agent = AgentProcess(tmp_path, config(dep.port)).start()
    script = tmp_path / "count.lua"
    script.write_text(COUNT_STATUSES)
    polled: list[int] = []
    try:
        await wait_status(agent.url, 200)
        idle = await flip_time(agent.url, dep, polled)
        await dep.revive()
        await wait_status(agent.url, 200)
        before = lag_histogram(await asyncio.to_thread(scrape, agent.url))

        flood = await asyncio.create_subprocess_exec(
            wrk, "-t2", "-c16", f"-d{FLOOD:.0f}s", "--timeout", "2s", "-s", str(script), agent.url + "/health",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        await asyncio.sleep(FLOOD / 2)
        loaded = await flip_time(agent.url, dep, polled)
        out = (await asyncio.wait_for(flood.communicate(), timeout=FLOOD + 30))[0].decode()
        after = lag_histogram(await asyncio.to_thread(scrape, agent.url))
    finally:
        agent.stop()
        await dep.kill()

    lag = {le: after[le] - before.get(le, 0.0) for le in after}
    p99 = quantile(lag, 0.99)
    statuses = {int(k): int(v) for k, v in re.findall(r"(\d{3})=(\d+)", out.split("STATUS", 1)[1].split("\n")[0])}
    errors = dict((k, int(v)) for k, v in re.findall(r"(\w+)=(\d+)", out.split("ERRORS", 1)[1].split("\n")[0]))
    requests = int(re.search(r"REQUESTS (\d+)", out).group(1))
    print(f"flood: {requests} requests ({requests / FLOOD:.0f}/s), statuses {statuses}, errors {errors};"
          f" flip idle {idle * 1000:.0f} ms, under flood {loaded * 1000:.0f} ms (bound {DOWN_BOUND * 1000:.0f} ms);"
          f" schedule lag over {lag[float('inf')]:.0f} samples: p99 <= {p99 * 1000:g} ms,"
          f" p50 <= {quantile(lag, 0.5) * 1000:g} ms, max <= {quantile(lag, 1.0) * 1000:g} ms")
    assert idle <= DOWN_BOUND + MARGIN, idle
    assert loaded <= DOWN_BOUND + MARGIN, (loaded, idle)
    assert lag[float("inf")] >= FLOOD * 40  # the histogram really covers the flood
    assert lag[0.1] >= 0.99 * lag[float("inf")], f"schedule lag p99 > 100 ms: {lag}"
    assert errors == {"connect": 0, "read": 0, "write": 0, "timeout": 0}, out
    assert set(statuses) == {200, 503} and sum(statuses.values()) == requests, out
    assert requests >= FLOOD * 500, out  # a flood, not a trickle
    assert set(polled) <= {200, 503}
    assert "Traceback" not in agent.logs()


JUNK_SECONDS = 6.0


@pytest.mark.e2e  # wrk, a real external program, as the marker says
def test_a_junk_flood_cannot_starve_the_probes(tmp_path: Path) -> None:
    """Four wrk processes keep 512 connections busy with junk (a path nobody probes, aiohttp's slow path):
    past max_request_rate it is refused with 429 before aiohttp parses it, so a prober asking /health every
    50 ms on fresh connections is answered 200 every time within its 1 s timeout, and the loop never stalls
    past max_loop_lag (which would fail the node closed)."""
    import subprocess
    import urllib.request

    wrk = require("wrk", "wrk")
    agent = AgentProcess(tmp_path, agent_toml() + memory_check()).start()
    try:
        wait_for(lambda: agent.get("/health")[0] == 200, what="up")
        floods = [subprocess.Popen([wrk, "-t1", "-c128", f"-d{JUNK_SECONDS:.0f}s", "--timeout", "2s",
                                    agent.url + "/junk"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                  for _ in range(4)]
        codes: list[int] = []
        slowest = 0.0
        end = time.monotonic() + JUNK_SECONDS - 1
        while time.monotonic() < end:
            t0 = time.monotonic()
            try:
                with urllib.request.urlopen(agent.url + "/health", timeout=1) as r:
                    codes.append(r.status)
            except OSError as e:
                codes.append(getattr(e, "code", 0))
            slowest = max(slowest, time.monotonic() - t0)
            time.sleep(max(0.0, 0.05 - (time.monotonic() - t0)))
        for f in floods:
            f.wait(JUNK_SECONDS + 10)
        # /metrics is not a probe: right after the flood this address's bucket is empty; it refills in 1 s.
        refused = wait_for(lambda: scrape(agent.url)['healthgate_http_dropped_connections_total{reason="rate"}'],
                           timeout=5, what="/metrics once the bucket refilled")
    finally:
        agent.stop()
    print(f"junk flood: {len(codes)} probes, slowest {slowest * 1000:.0f} ms, {refused:.0f} junk requests refused")
    assert codes and set(codes) == {200}, codes
    assert refused > 1000  # the flood really pressed on the limit
    assert "loop_stalled" not in agent.logs()

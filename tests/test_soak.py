"""Soak: checks every 100 ms against toggling dependencies for HEALTHGATE_SOAK_SECONDS (default 600)."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import aiohttp
import pytest

from tests.faulty import HttpDependency, TcpDependency
from tests.helpers import ROOT, AgentProcess, agent_toml, process_stats, scrape, toml_table

SECONDS = float(os.environ.get("HEALTHGATE_SOAK_SECONDS", "600"))
WARMUP = min(60.0, SECONDS / 5)
TOGGLE = 3.0  # seconds between dependency state changes
SAMPLE = 5.0  # seconds between resource samples
ARTIFACTS = ROOT / "tests" / "artifacts"



def check(name: str, **keys: object) -> str:
    return toml_table("[[checks]]", name=name, interval="100ms", timeout="50ms", rise=2, fall=2, **keys)


@pytest.mark.slow
@pytest.mark.timeout(SECONDS + 300)  # the run is SECONDS long: the suite's 300 s per test would end it
async def test_soak_resources_stay_flat(tmp_path: Path) -> None:
    """Under 10 minutes of 100 ms checks and toggling dependencies, RSS grows < 5 MB after warm-up and
    open fds and asyncio tasks stay flat; the verdict keeps following the dependencies."""
    tcp = await TcpDependency().start()
    web = await HttpDependency().start()
    hang = await TcpDependency("hang").start()
    checks = "".join([
        check("db", type="tcp", port=tcp.port),
        check("api", type="http", url=web.url),
        check("stuck", type="http", url=f"http://127.0.0.1:{hang.port}/", critical=False),
        check("mem", type="memory", max_used_percent=100),
        check("disk", type="disk", path="/", min_free_percent=0, fail_read_only=False),
    ])
    # flap_threshold = 0 keeps every toggle visible as a transition: the point is churn.
    agent = AgentProcess(tmp_path, agent_toml(policy={"flap_threshold": 0}) + checks).start()
    samples: list[dict[str, float]] = []
    codes: dict[int, int] = {}
    stop = asyncio.Event()

    async def toggle() -> None:
        n = 0
        while not stop.is_set():
            await asyncio.sleep(TOGGLE)
            n += 1
            if n % 2:
                await tcp.kill()
            else:
                await tcp.revive()
            if n % 3 == 0:
                web.healthy = not web.healthy

    async def poll() -> None:
        """A load balancer (fresh connection per probe) and a Prometheus scraper (keep-alive)."""
        timeout = aiohttp.ClientTimeout(total=2)
        lb = aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(force_close=True))
        prom = aiohttp.ClientSession(timeout=timeout)
        i = 0
        try:
            while not stop.is_set():
                i += 1
                try:
                    async with lb.get(agent.url + "/health") as r:
                        codes[r.status] = codes.get(r.status, 0) + 1
                    if i % 20 == 0:
                        for path in ("/metrics", "/status", "/live"):
                            async with prom.get(agent.url + path) as r:
                                await r.read()
                except (aiohttp.ClientError, TimeoutError):
                    codes[-1] = codes.get(-1, 0) + 1
                await asyncio.sleep(0.05)
        finally:
            await lb.close()
            await prom.close()

    async def sample() -> None:
        while not stop.is_set():
            stats = await asyncio.to_thread(process_stats, agent.proc.pid)
            m = await asyncio.to_thread(scrape, agent.url)
            samples.append({"t": time.monotonic() - t0, **stats, "tasks": m["healthgate_asyncio_tasks"],
                            "transitions": sum(v for k, v in m.items() if k.startswith("healthgate_transitions_total"))})
            await asyncio.sleep(SAMPLE)

    t0 = time.monotonic()
    tasks = [asyncio.create_task(c()) for c in (toggle, poll, sample)]
    try:
        await asyncio.sleep(SECONDS)
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        alive = agent.proc.poll() is None
        agent.stop()
        await tcp.kill()
        await hang.kill()
        await web.stop()

    assert alive, agent.logs()[-2000:]
    after = [s for s in samples if s["t"] >= WARMUP]
    assert len(after) >= 3, samples
    base = after[0]
    rss_growth = max(s["rss"] for s in after) - base["rss"]
    fds = [s["fds"] for s in after]
    ntasks = [s["tasks"] for s in after]
    report = (f"soak {SECONDS:.0f}s: rss {base['rss'] / 2**20:.1f} MiB -> max {max(s['rss'] for s in after) / 2**20:.1f}"
              f" MiB (+{rss_growth / 2**20:.2f}), fds {min(fds)}..{max(fds)}, tasks {min(ntasks):.0f}..{max(ntasks):.0f},"
              f" transitions {samples[-1]['transitions']:.0f}, /health codes {codes}")
    print(report)
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "soak-report.txt").write_text(report + "\n" + "\n".join(map(str, samples)) + "\n")
    assert rss_growth < 5 * 2**20, report
    # Flat: a few fds and tasks come and go with in-flight probes and requests; a leak grows steadily.
    assert max(fds) - min(fds) <= 10, report
    assert max(ntasks) - min(ntasks) <= 10, report
    assert samples[-1]["transitions"] >= SECONDS / (TOGGLE * 4), report  # it kept following the toggles
    assert codes.get(200) and codes.get(503), report

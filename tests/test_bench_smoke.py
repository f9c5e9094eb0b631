"""The benchmark harness's pure parts: parsers of recorded wrk, /proc and py-spy output, histogram quantiles."""

from __future__ import annotations

import math
import tomllib
from pathlib import Path

import pytest

from agent.config import parse_config
from agent.serving.metrics import make_registry, render
from agent.state import AgentState
from bench.core import agent_config, checks20
from bench.deps import per_1000
from bench.parse import (
    Summary,
    histogram_delta,
    histogram_quantile,
    parse_content_length,
    parse_haproxy_stat,
    parse_histogram,
    parse_redis_info,
    parse_wrk,
    percentile,
    proc_cpu_ticks,
    proc_ctxt_switches,
    proc_rss_bytes,
    proc_smaps_rollup,
    ratios,
)
from bench.profile import summarise
from tests.helpers import PASSING

DATA = Path(__file__).parent / "data"
WRK = DATA / "wrk"


def test_wrk_keep_alive_output_is_parsed_with_units() -> None:
    """A recorded keep-alive run gives requests/s, count, duration and percentiles converted to seconds."""
    r = parse_wrk((WRK / "keepalive-c50.txt").read_text())
    assert (r.rps, r.requests, r.duration) == (70954.17, 148989, 2.10)
    assert r.p50 == pytest.approx(502e-6) and r.p99 == pytest.approx(2.34e-3)
    assert r.latency[90] == pytest.approx(730e-6)
    assert (r.socket_errors, r.non_2xx) == (0, 0)


def test_wrk_close_output_is_parsed() -> None:
    """A recorded Connection: close run parses like a keep-alive one."""
    r = parse_wrk((WRK / "close-c50.txt").read_text())
    assert r.rps == 9442.54 and r.p50 == pytest.approx(2.46e-3) and r.p99 == pytest.approx(14.86e-3)


def test_wrk_non_2xx_answers_are_counted() -> None:
    """wrk's non-2xx line is read, so a run against a down server can't pass for a fast one."""
    r = parse_wrk((WRK / "down-c1.txt").read_text())
    assert r.non_2xx == r.requests == 49823 and r.p50 == pytest.approx(24e-6)


def test_wrk_socket_errors_are_summed() -> None:
    """Every kind of socket error wrk reports is added up."""
    text = (WRK / "close-c50.txt").read_text().replace(
        "Requests/sec:", "  Socket errors: connect 1, read 2, write 3, timeout 4\nRequests/sec:")
    assert parse_wrk(text).socket_errors == 10


@pytest.mark.parametrize("text", ["", "unable to connect to 127.0.0.1:1 Connection refused\n",
                                  "Running 2s test @ http://x\n  Latency Distribution\n     50%  1.00ms\n"])
def test_unfinished_wrk_output_is_refused(text: str) -> None:
    """Output that is not a finished `wrk --latency` run raises instead of yielding numbers."""
    with pytest.raises(ValueError):
        parse_wrk(text)


BUCKETS = [(0.001, 10.0), (0.01, 60.0), (0.1, 100.0), (math.inf, 100.0)]


@pytest.mark.parametrize("q, want", [(0.1, 0.001), (0.5, 0.001 + 0.009 * 40 / 50), (0.99, 0.01 + 0.09 * 39 / 40),
                                     (0.05, 0.0005)])
def test_histogram_quantile_interpolates_like_prometheus(q: float, want: float) -> None:
    """Quantiles interpolate linearly inside the bucket holding the rank, from 0 for the first bucket."""
    assert histogram_quantile(q, BUCKETS) == pytest.approx(want)


def test_histogram_quantile_edges() -> None:
    """An empty histogram has no quantile; a rank in +Inf answers the highest finite bound."""
    assert math.isnan(histogram_quantile(0.5, [(0.1, 0.0), (math.inf, 0.0)]))
    assert histogram_quantile(0.99, [(0.1, 5.0), (math.inf, 10.0)]) == 0.1


def test_schedule_lag_quantiles_from_the_agents_own_metrics() -> None:
    """The lag histogram scraped twice from a real registry gives the quantiles of what happened between."""
    state = AgentState(parse_config({"checks": [PASSING]}), 0.0)
    registry = make_registry(state)
    state.schedule_lag(0.5)  # before the window: must not count
    before = parse_histogram(render(registry).decode(), "healthgate_check_schedule_lag_seconds")
    for lag in [0.0002] * 90 + [0.012] * 9 + [0.018]:
        state.schedule_lag(lag)
    after = parse_histogram(render(registry).decode(), "healthgate_check_schedule_lag_seconds")
    delta = histogram_delta(after, before)
    assert delta[-1][1] == 100
    assert 0 < histogram_quantile(0.5, delta) <= 0.0005
    # True p99 is 12 ms: a 20 ms bound keeps the estimate under the 20 ms target (10/25 ms bounds read 23.5).
    assert histogram_quantile(0.99, delta) == pytest.approx(0.019)


def test_histogram_delta_refuses_changed_buckets() -> None:
    """Two scrapes with different buckets can't be subtracted."""
    with pytest.raises(ValueError):
        histogram_delta([(1.0, 1.0), (math.inf, 1.0)], [(2.0, 0.0), (math.inf, 0.0)])


STAT = ("4922 (a b) c) R 4920 4920 9357 0 -1 4194304 103 0 0 0 250 37 0 0 20 0 1 0 166624 2998272 394 "
        "18446744073709551615 94804803207168 0 0 0 0 0 0 0 17 0 0 0 0 0 0")


def test_proc_files_are_parsed() -> None:
    """utime+stime come from after the last ')' of stat (comm may hold both); VmRSS and smaps are bytes."""
    assert proc_cpu_ticks(STAT) == 287
    assert proc_rss_bytes("Name:\tx\nVmRSS:\t    2200 kB\nVmSwap:\t0 kB\n") == 2200 * 1024
    roll = proc_smaps_rollup("7f-7f ---p 00000000 00:00 0 [rollup]\nRss:  100 kB\nPss:   60 kB\n")
    assert roll == {"Rss": 102400, "Pss": 61440}


def test_summaries_and_paired_ratios() -> None:
    """A summary is the median with min and max; ratios pair runs of the same repetition."""
    s = Summary.of([3.0, 1.0, 2.0, math.nan])
    assert (s.median, s.lo, s.hi, s.n) == (2.0, 1.0, 3.0, 3)
    assert s.fmt(digits=0) == "2 [1–3]"
    assert ratios([10.0, 30.0, 8.0], [100.0, 100.0, 0.0]).fmt(100, 0, "%") == "20% [10–30]"
    assert Summary.of([]).fmt() == "n/a"


def test_py_spy_raw_output_is_summarised() -> None:
    """Self samples go to the leaf frame; inclusive samples skip the frames above the event loop's run."""
    raw = ("main (agent/cli/main.py:1);Runner.run (asyncio/runners.py:118) 40\n"
           "main (agent/cli/main.py:1);Runner.run (asyncio/runners.py:118);HealthProtocol.data_received "
           "(agent/serving/fasthealth.py:200) 50\n"
           "main (agent/cli/main.py:1);Runner.run (asyncio/runners.py:118);HealthProtocol.data_received "
           "(agent/serving/fasthealth.py:182);FastHealth.answer (agent/serving/fasthealth.py:132) 10\n")
    total, own, incl, lines = summarise(raw)
    assert total == 100
    assert lines[0] == ("agent/serving/fasthealth.py:200 (HealthProtocol.data_received)", 50)
    assert own[0] == ("HealthProtocol.data_received (agent/serving/fasthealth.py)", 50)
    assert dict(incl) == {"HealthProtocol.data_received (agent/serving/fasthealth.py)": 60,
                          "FastHealth.answer (agent/serving/fasthealth.py)": 10}


@pytest.mark.parametrize("checks", [None, checks20(6379, 8080)])
def test_bench_agent_configs_are_valid(checks: str | None) -> None:
    """The configs the bench gives the agent (default, and 20 checks at 1 s) pass the agent's validation."""
    cfg = parse_config(tomllib.loads(agent_config(checks).replace("{port}", "18080")))
    assert cfg.server.listen == ("127.0.0.1", 18080) and cfg.server.shutdown_drain == 0
    assert len(cfg.checks) == (2 if checks is None else 20)


def test_redis_info_is_parsed_into_command_counts() -> None:
    """Recorded `INFO all`: counters are numbers and every cmdstat line is a dict with its calls."""
    info = parse_redis_info((DATA / "redis-info.txt").read_text())
    assert info["total_connections_received"] == 3
    assert info["cmdstat_ping"]["calls"] == 1 and info["cmdstat_set"]["usec"] == 73
    assert info["db0"] == {"keys": 1, "expires": 0, "avg_ttl": 0}
    assert info["redis_version"] == "7.0.15"


def test_haproxy_show_stat_is_parsed() -> None:
    """Recorded `show stat` CSV gives each proxy/server pair its status; other text is refused."""
    states = parse_haproxy_stat((DATA / "haproxy-show-stat.csv").read_text())
    assert states[("be_agent", "s1")] == "DOWN" and states[("be_native", "BACKEND")] == "DOWN"
    with pytest.raises(ValueError):
        parse_haproxy_stat("Unknown command\n")


def test_amplification_subtracts_the_idle_rate() -> None:
    """Per-1000-probe work is what a flood window adds beyond the idle window's rate."""
    idle = {"seconds": 10.0, "redis_commands": 30.0}
    assert per_1000(idle, {"seconds": 5.0, "probes": 50000, "redis_commands": 15.0}, "redis_commands") == 0
    assert per_1000(idle, {"seconds": 5.0, "probes": 1000, "redis_commands": 2015.0}, "redis_commands") == 2000
    assert math.isnan(per_1000(idle, {"seconds": 5.0, "probes": 0, "redis_commands": 15.0}, "redis_commands"))


def test_nearest_rank_percentiles_and_content_length() -> None:
    """Percentiles of raw samples are nearest-rank; Content-Length is read case-insensitively."""
    values = [float(i) for i in range(1, 101)]
    assert (percentile(values, 0.5), percentile(values, 0.99), percentile(values, 1.0)) == (50.0, 99.0, 100.0)
    assert math.isnan(percentile([], 0.5))
    assert parse_content_length(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nX: y") == 3
    assert parse_content_length(b"HTTP/1.1 204 No Content\r\nX: y") == 0


def test_context_switches_are_summed() -> None:
    """Voluntary and involuntary context switches add up to the thread's wake-ups."""
    status = "Name:\tpython\nvoluntary_ctxt_switches:\t120\nnonvoluntary_ctxt_switches:\t7\n"
    assert proc_ctxt_switches(status) == 127

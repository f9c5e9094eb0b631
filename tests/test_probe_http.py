"""http: status sets and ranges, body matching, latency, redirects, TLS and capped bodies against real servers."""

from __future__ import annotations

import pytest

from agent.probes import PROBES
from agent.probes.base import Context
from agent.runner import Runner
from tests.outage import drill, fast_check, outage
from tests.servers import HttpServer


@pytest.fixture
async def ctx():
    context = Context()
    yield context
    await context.close()


async def sample(ctx: Context, **keys):
    cfg = PROBES["http"].Config(**{"name": "h", "type": "http", "timeout": "900ms", **keys})
    return await Runner(ctx).run(cfg)


async def test_faults_take_node_down_and_back(start_agent, http_server) -> None:
    """503, too slow, stopped and hung upstreams each make the node DOWN in time, and it comes back each time."""
    check = fast_check("api", type="http", url=f"{http_server.url}/", max_latency="80ms")
    agent = await start_agent(drill(check))

    def status(code: int):
        return lambda: setattr(http_server, "status", code)

    def delay(seconds: float):
        return lambda: setattr(http_server, "delay", seconds)

    await outage(agent, check, status(503), status(200), "http: 503 after")
    await outage(agent, check, delay(0.1), delay(0), "> 80 ms")
    await outage(agent, check, delay(1), delay(0), "timeout after 150 ms")
    await outage(agent, check, http_server.stop, http_server.start, "connection refused")


async def test_slow_answer_reason_names_both_latencies(ctx, http_server) -> None:
    """A slow 200 fails as `http: 200 after N ms > M ms` with the latency observed."""
    http_server.delay = 0.12
    r = await sample(ctx, url=f"{http_server.url}/", max_latency="50ms")
    assert (r.ok, r.kind) == (False, "slow"), r
    assert r.reason.startswith("http: 200 after ") and r.reason.endswith(" ms > 50 ms"), r.reason
    assert r.observation.value >= 0.12


@pytest.mark.parametrize("expect, status, ok", [
    (["2xx"], 204, True),
    ([200, "400-404"], 404, True),
    ([200, "400-404"], 405, False),
    (["200-299", 503], 503, True),
    ([200], 201, False),
])
async def test_status_sets_and_ranges(ctx, http_server, expect, status, ok) -> None:
    """expect_status mixes single codes, `Nxx` classes and `low-high` ranges."""
    http_server.status = status
    r = await sample(ctx, url=f"{http_server.url}/", expect_status=expect)
    assert r.ok is ok, r
    assert r.observation.values == (("status_code", float(status), ""),)


async def test_body_substring_and_regex(ctx, http_server) -> None:
    """body_contains and body_regex match the body; a miss fails with kind `body`."""
    http_server.body = '{"status": "serving", "replicas": 3}'
    url = f"{http_server.url}/"
    assert (await sample(ctx, url=url, body_contains='"serving"')).ok
    assert (await sample(ctx, url=url, body_regex=r'"replicas": [1-9]')).ok
    miss = await sample(ctx, url=url, body_regex=r'"replicas": 0\b')
    assert (miss.ok, miss.kind) == (False, "body") and "does not match" in miss.reason


async def test_redirects_only_when_asked(ctx, http_server) -> None:
    """A redirect is a failing status (naming its target) unless follow_redirects = true."""
    r = await sample(ctx, url=f"{http_server.url}/redirect")
    assert (r.ok, r.kind) == (False, "status") and "redirect to / not followed" in r.reason, r.reason
    assert (await sample(ctx, url=f"{http_server.url}/redirect", follow_redirects=True)).ok


SECRET_HEADERS = {"Authorization": "Bearer tok-3f9a", "Cookie": "sid=c00k1e", "X-Api-Key": "k3y-77",
                  "X-Vault-Token": "hvs.v4ult"}


@pytest.fixture
def other_origin():
    """A second aiohttp server on another loopback address and port, recording the headers it is sent."""
    server = HttpServer(host="127.0.0.2").start()
    yield server
    server.close()


async def test_a_redirect_to_another_origin_carries_no_secret_header(ctx, http_server, other_origin) -> None:
    """Followed to another host and port, a redirect sends none of the headers masked as secrets (nor the url's
    password, nor Host); a redirect within the origin keeps them all."""
    keys = {"headers": {**SECRET_HEADERS, "X-Probe": "healthgate"}, "follow_redirects": True}
    assert (await sample(ctx, url=f"{http_server.url}/redirect", **keys)).ok
    assert {k: http_server.seen_headers[-1].get(k) for k in SECRET_HEADERS} == SECRET_HEADERS

    http_server.redirect_to = f"{other_origin.url}/"
    r = await sample(ctx, url=f"{http_server.url}/redirect", **keys)
    assert r.ok, r
    seen = other_origin.seen_headers[-1]
    assert seen["X-Probe"] == "healthgate"
    assert not [v for v in SECRET_HEADERS.values() for h in seen.values() if v.split()[-1] in h], seen

    userinfo = http_server.url.replace("http://", "http://probe:pa55w0rd@")
    http_server.auth, http_server.redirect_to = {"Basic cHJvYmU6cGE1NXcwcmQ="}, "/auth"
    assert (await sample(ctx, url=f"{userinfo}/redirect", follow_redirects=True)).ok  # the same origin: sent
    http_server.redirect_to = f"{other_origin.url}/"
    r = await sample(ctx, url=f"{userinfo}/redirect", headers={"Host": "api.internal"}, follow_redirects=True)
    assert r.ok, r
    seen = other_origin.seen_headers[-1]
    assert "Authorization" not in seen and seen["Host"] == other_origin.url.removeprefix("http://"), seen
    assert len(other_origin.seen_headers) == 2


async def test_redirects_are_counted(ctx, http_server) -> None:
    """max_redirects redirects are followed; one more fails with kind `redirect`."""
    http_server.redirect_to = "/redirect"  # a loop
    r = await sample(ctx, url=f"{http_server.url}/redirect", follow_redirects=True, max_redirects=3)
    assert (r.ok, r.kind, r.reason) == (False, "redirect", "http: more than 3 redirects"), r


async def test_endless_body_is_read_only_up_to_the_cap(ctx, http_server) -> None:
    """A body that never ends is read up to max_body_bytes, so matching it stays bounded."""
    r = await sample(ctx, url=f"{http_server.url}/endless", body_contains="y", max_body_bytes=200_000)
    assert (r.ok, r.kind) == (False, "body"), r
    assert (await sample(ctx, url=f"{http_server.url}/endless", body_contains="xxxx")).ok


async def test_method_headers_and_body_are_sent(ctx, http_server) -> None:
    """The configured method, headers and request body reach the server."""
    r = await sample(ctx, url=f"{http_server.url}/", method="POST", body="ping",
                     headers={"X-Probe": "healthgate", "Host": "api.internal"})
    assert r.ok, r
    seen = http_server.seen_headers[-1]
    assert seen["X-Probe"] == "healthgate" and seen["Host"] == "api.internal"
    assert seen["User-Agent"].startswith("healthgate/")


async def test_ipv6_url(ctx) -> None:
    """An http URL with an IPv6 literal works."""
    server = HttpServer(host="::1").start()
    try:
        assert (await sample(ctx, url=f"{server.url}/")).ok
    finally:
        server.close()


@pytest.fixture
def https_server(certs):
    server = HttpServer(ssl_context=certs.server_context(certs.issue("127.0.0.1", "localhost"))).start()
    yield server
    server.close()


async def test_tls_verification(ctx, certs, https_server) -> None:
    """https verifies against ca_file (or the system CAs), checks the name, and tls_verify = false skips both."""
    url = f"{https_server.url}/"
    assert (await sample(ctx, url=url, ca_file=certs.ca_file)).ok
    untrusted = await sample(ctx, url=url)
    assert (untrusted.ok, untrusted.kind) == (False, "tls"), untrusted
    assert "certificate not accepted: unable to get local issuer certificate" in untrusted.reason
    wrong_name = await sample(ctx, url=url, ca_file=certs.ca_file, server_name="db.example")
    assert (wrong_name.ok, wrong_name.kind) == (False, "tls") and "db.example" in wrong_name.reason, wrong_name
    assert (await sample(ctx, url=url, tls_verify=False)).ok


async def test_expired_certificate_takes_node_down_and_back(start_agent, certs, https_server) -> None:
    """An upstream whose certificate expires makes the node DOWN in time; a renewed one brings it UP."""
    check = fast_check("api-tls", type="http", url=f"{https_server.url}/", ca_file=certs.ca_file)
    agent = await start_agent(drill(check))
    good = https_server.ssl_context
    expired = certs.server_context(certs.issue("127.0.0.1", expired=True))

    def swap(context):
        def do() -> None:
            https_server.stop()
            https_server.ssl_context = context
            https_server.start()
        return do

    await outage(agent, check, swap(expired), swap(good), "certificate has expired")


async def test_runaway_regex_neither_stalls_the_loop_nor_piles_threads(ctx, http_server) -> None:
    """A body_regex that backtracks for seconds fails each sample on time: the loop keeps running (the match
    lets go of the GIL) and one check never holds more than one thread."""
    import threading

    http_server.body = "a" * 40 + "!"  # (a|aa)+$ backtracks for minutes on this
    keys = {"url": f"{http_server.url}/", "body_regex": r"(a|aa)+$", "timeout": "200ms"}
    threads = threading.active_count()
    for _ in range(4):
        r = await sample(ctx, **keys)
        assert not r.ok and r.kind in ("timeout", "hung"), r  # hung: the previous match still runs
        assert r.duration < 0.35, r  # the runner got control back on time: the loop was not blocked
        assert threading.active_count() <= threads + 1

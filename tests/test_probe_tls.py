"""tls: chain, name and days left, against a real TLS server whose certificate the test swaps."""

from __future__ import annotations

import pytest

from agent.probes import PROBES
from agent.probes.base import Context
from agent.runner import Runner
from tests.outage import drill, fast_check, outage
from tests.servers import TLSServer


@pytest.fixture
def tls_server(certs):
    server = TLSServer(certs.server_context(certs.issue("127.0.0.1", "localhost"))).start()
    yield server
    server.stop()


async def sample(**keys):
    ctx = Context()
    cfg = PROBES["tls"].Config(**{"name": "t", "type": "tls", "timeout": "900ms", **keys})
    try:
        return await Runner(ctx).run(cfg)
    finally:
        await ctx.close()


async def test_expired_certificate_takes_node_down_and_back(start_agent, certs, tls_server) -> None:
    """A certificate that expires makes the node DOWN in time (`certificate has expired`); a renewed one UP."""
    # Two handshakes per failing sample (the rejected one, then an unverified one to read the expiry), the
    # server's side in a thread of this process: 400 ms, not the drill's 150, so a loaded machine does not
    # turn the expiry into a timeout.
    check = fast_check("edge-cert", type="tls", port=tls_server.port, ca_file=certs.ca_file,
                       interval="500ms", timeout="400ms")
    agent = await start_agent(drill(check))
    good = tls_server.context
    expired = certs.server_context(certs.issue("127.0.0.1", expired=True))
    await outage(agent, check, lambda: tls_server.use(expired), lambda: tls_server.use(good),
                 "certificate not accepted: certificate has expired")


async def test_valid_certificate_reports_days_left(certs, tls_server) -> None:
    """A valid certificate passes; the observed value is its days left, with the expiry as a timestamp series."""
    r = await sample(port=tls_server.port, ca_file=certs.ca_file, min_days_left=30)
    assert r.ok, r
    assert r.observation.unit == "days" and 364 < r.observation.value < 365.1
    assert r.observation.values[0][0] == "expiry_timestamp"
    assert "expires" in r.observation.detail and "TLSv1." in r.observation.detail


async def test_expiring_soon_is_down(certs, tls_server) -> None:
    """A certificate with fewer days left than min_days_left fails as `expiring`, naming both numbers."""
    tls_server.use(certs.server_context(certs.issue("127.0.0.1", days=5)))
    r = await sample(port=tls_server.port, ca_file=certs.ca_file, min_days_left=10)
    assert (r.ok, r.kind) == (False, "expiring"), r
    assert f"tls 127.0.0.1:{tls_server.port}: certificate expires in 5.0 days < 10 days" == r.reason
    assert 4.9 < r.observation.value < 5.1


async def test_rejected_certificates_say_why(certs, tls_server) -> None:
    """An untrusted chain, a wrong name and an expired leaf fail with OpenSSL's reason and their own kind."""
    untrusted = await sample(port=tls_server.port)
    assert (untrusted.ok, untrusted.kind) == (False, "untrusted"), untrusted
    assert "unable to get local issuer certificate" in untrusted.reason
    wrong = await sample(port=tls_server.port, ca_file=certs.ca_file, server_name="db.example")
    assert (wrong.ok, wrong.kind) == (False, "hostname") and "db.example" in wrong.reason, wrong
    tls_server.use(certs.server_context(certs.issue("127.0.0.1", expired=True)))
    expired = await sample(port=tls_server.port, ca_file=certs.ca_file)
    assert (expired.ok, expired.kind) == (False, "expired"), expired
    assert expired.observation is not None and -1.1 < expired.observation.value < -0.9  # read without trust


async def test_without_verification_only_expiry_counts(certs, tls_server) -> None:
    """tls_verify = false accepts an unknown CA and a wrong name, but still fails an expired certificate."""
    assert (await sample(port=tls_server.port, tls_verify=False, server_name="db.example")).ok
    tls_server.use(certs.server_context(certs.issue("127.0.0.1", expired=True)))
    r = await sample(port=tls_server.port, tls_verify=False)
    assert (r.ok, r.kind) == (False, "expired") and "expired 1.0 days ago" in r.reason, r


async def test_plain_tcp_and_hung_servers_fail(blackhole_server) -> None:
    """A closed port is `refused`; a server that accepts and never handshakes is a timeout."""
    hung = await sample(port=blackhole_server.port, timeout="300ms")
    assert (hung.ok, hung.kind) == (False, "timeout"), hung
    port = blackhole_server.port
    blackhole_server.stop()
    refused = await sample(port=port)
    assert (refused.ok, refused.kind, refused.reason) == (False, "refused",
                                                          f"tls 127.0.0.1:{port}: connection refused")

"""dns: names resolve through dnsmasq on a loopback port, or through the system resolver."""

from __future__ import annotations

import pytest

from agent.config import ConfigError, parse_config
from agent.probes import PROBES
from agent.probes.base import Context
from agent.runner import Runner
from tests.outage import drill, fast_check, outage


async def sample(**keys):
    cfg = PROBES["dns"].Config(**{"name": "d", "type": "dns", "timeout": "500ms", **keys})
    return await Runner(Context()).run(cfg)


async def test_expected_addresses(dns_server) -> None:
    """A and AAAA answers come from the given server; every expected address must be among them."""
    r = await sample(query_name="app.test", server=dns_server.server, expect_addresses=["127.0.0.3"])
    assert r.ok, r
    assert "127.0.0.2" in r.observation.detail and r.observation.values == (("answers", 2.0, ""),)
    assert (await sample(query_name="app.test", record_type="AAAA", server=dns_server.server,
                         expect_addresses=["::2"])).ok
    miss = await sample(query_name="app.test", server=dns_server.server, expect_addresses=["127.0.0.9"])
    assert (miss.ok, miss.kind) == (False, "mismatch") and miss.reason.endswith("lack 127.0.0.9"), miss


async def test_missing_name_is_nxdomain(dns_server) -> None:
    """An unknown name is NXDOMAIN, a refused query names the rcode, a name without AAAA is `no_answer`."""
    r = await sample(query_name="gone.test", server=dns_server.server)
    assert (r.ok, r.kind) == (False, "nxdomain"), r
    assert r.reason == f"dns gone.test: NXDOMAIN (no such name) from {dns_server.server}"
    refused = await sample(query_name="example.com", server=dns_server.server)  # no upstream: refused
    assert (refused.ok, refused.kind) == (False, "server_error"), refused
    assert refused.reason == f"dns example.com: {dns_server.server} failed: REFUSED"
    no_v6 = await sample(query_name="v4only.test", record_type="AAAA", server=dns_server.server)
    assert (no_v6.ok, no_v6.kind) == (False, "no_answer"), no_v6


async def test_changed_record_and_stopped_server_take_node_down_and_back(start_agent, dns_server) -> None:
    """A record moved elsewhere and a stopped DNS server each make the node DOWN in time, and it comes back."""
    check = fast_check("discovery", type="dns", query_name="app.test", server=dns_server.server,
                       expect_addresses=["127.0.0.2"])
    agent = await start_agent(drill(check))
    await outage(agent, check, lambda: dns_server.set_hosts("127.0.0.9 app.test\n"),
                 lambda: dns_server.set_hosts("127.0.0.2 app.test\n"), "lack 127.0.0.2")
    # UDP has no refusal to hear (dnspython ignores ICMP port-unreachable): a stopped server is silence.
    await outage(agent, check, dns_server.stop, dns_server.start, "timeout after 150 ms")


async def test_system_resolver() -> None:
    """Without `server`, the name resolves the way the node's applications see it (getaddrinfo)."""
    r = await sample(query_name="localhost", expect_addresses=["127.0.0.1"])
    assert r.ok, r


@pytest.mark.parametrize("server", ["127.0.0.1:53", "[::1]:5353", "10.0.0.2", "::1"])
def test_server_forms(server: str) -> None:
    """`server` takes an IP with an optional port, IPv6 in brackets."""
    parse_config({"checks": [{"name": "d", "type": "dns", "query_name": "a.test", "server": server}]})


def test_server_must_be_an_address() -> None:
    """A resolver given by name is refused: resolving the resolver would be circular."""
    with pytest.raises(ConfigError) as err:
        parse_config({"checks": [{"name": "d", "type": "dns", "query_name": "a.test", "server": "ns1.test"}]})
    assert err.value.errors[0].startswith("checks[0] (d).server: 'ns1.test' must be an IP address")

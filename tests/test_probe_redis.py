"""redis: PING, auth, TLS, role and loading against real redis-server processes."""

from __future__ import annotations

import asyncio
import re
import signal

from agent.probes import PROBES
from agent.probes.base import Context
from agent.runner import Runner
from tests.helpers import async_wait_for, wait_for
from tests.outage import drill, fast_check, outage, wait_up

PASSWORD = "r3dis p@ss:word"


async def sample(**keys):
    cfg = PROBES["redis"].Config(**{"name": "r", "type": "redis", "timeout": "900ms", **keys})
    return await Runner(Context()).run(cfg)


async def test_stopped_and_frozen_server_take_node_down_and_back(start_agent, redis_factory) -> None:
    """A stopped redis (refused) and a frozen one (accepts, never answers) each make the node DOWN in time."""
    redis = redis_factory(password=PASSWORD)
    check = fast_check("cache", type="redis", port=redis.port, password=PASSWORD)
    agent = await start_agent(drill(check))
    await outage(agent, check, redis.stop, redis.start, "connection refused")
    await outage(agent, check, lambda: redis.proc.send_signal(signal.SIGSTOP),
                 lambda: redis.proc.send_signal(signal.SIGCONT), "timeout after 150 ms")


async def test_demoted_master_takes_node_down_and_back(start_agent, redis_factory) -> None:
    """role = master fails once the server is made a replica (REPLICAOF) and passes again when promoted."""
    primary, other = redis_factory(), redis_factory()
    check = fast_check("cache-role", type="redis", port=other.port, role="master")
    agent = await start_agent(drill(check))
    await outage(agent, check, lambda: other.cli("REPLICAOF", "127.0.0.1", str(primary.port)),
                 lambda: other.cli("REPLICAOF", "NO", "ONE"), "role is replica, expected master")


async def test_replica_needs_its_master_link(redis_factory) -> None:
    """role = replica passes while the link to the master is up and fails, naming the master, when it is down."""
    primary, replica = redis_factory(), redis_factory()
    replica.cli("REPLICAOF", "127.0.0.1", str(primary.port))
    wait_for(lambda: "master_link_status:up" in replica.cli("INFO", "replication"), what="replica linked")
    r = await sample(port=replica.port, role="replica")
    assert r.ok and "role replica" in r.observation.detail, r
    assert (await sample(port=primary.port, role="replica")).reason.endswith("role is master, expected replica")
    primary.stop()
    wait_for(lambda: "master_link_status:down" in replica.cli("INFO", "replication"), what="link down")
    r = await sample(port=replica.port, role="replica")
    assert (r.ok, r.kind) == (False, "replication"), r
    assert f"link to its master 127.0.0.1:{primary.port} is down" in r.reason


def loading(redis) -> str:
    """INFO persistence's loading field (not async_loading's)."""
    m = re.search(r"^loading:(\d)", redis.cli("INFO", "persistence"), re.M)
    return m.group(1) if m else ""


async def test_loading_dataset_is_down(start_agent, redis_factory) -> None:
    """A restarted redis still loading its dataset (loading:1) keeps the node DOWN, for that reason, until the
    load completes. (The restart itself is a moment of `connection refused` first: the held connection of
    the last sample sees the stop at once, so the reason moves from refused to loading.)"""
    redis = redis_factory()
    redis.cli("DEBUG", "POPULATE", "15000")
    redis.cli("SAVE")
    check = fast_check("cache-load", type="redis", port=redis.port)
    agent = await start_agent(drill(check))

    def restart_slowly() -> None:  # ~1.5 s of loading, answering clients meanwhile
        redis.stop()
        redis.start(wait=False, **{"key-load-delay": "100", "loading-process-events-interval-bytes": "1024"})
        wait_for(lambda: loading(redis) == "1", what="loading")

    await wait_up(agent)
    await asyncio.to_thread(restart_slowly)
    await async_wait_for(lambda: _reason_has(agent, "loading the dataset into memory"), timeout=10,
                         what="down for loading")
    while await asyncio.to_thread(loading, redis) == "1":
        assert (await agent.get("/health"))[0] == 503, "up while redis still loads"
    await wait_up(agent)


async def _reason_has(agent, text: str) -> bool:
    return (await agent.get("/health"))[0] == 503 and text in agent.state.snapshot.verdict.reason


async def test_auth_acl_user_db_and_unix_socket(redis_factory) -> None:
    """Password and ACL user logins pass, wrong credentials fail as `auth`; db and unix sockets work."""
    redis = redis_factory(password=PASSWORD)
    redis.cli("ACL", "SETUSER", "probe", "on", ">probe-pw", "+ping", "+info", "+select")
    assert (await sample(port=redis.port, password=PASSWORD, db=3)).ok
    assert (await sample(port=redis.port, username="probe", password="probe-pw")).ok
    assert (await sample(path=str(redis.dir / "redis.sock"), password=PASSWORD)).ok
    for keys in ({"password": "wrong"}, {"username": "probe", "password": "wrong"}, {}):
        r = await sample(port=redis.port, **keys)
        assert (r.ok, r.kind) == (False, "auth"), (keys, r)
        assert r.reason.startswith(f"redis 127.0.0.1:{redis.port}: authentication failed")
    r = await sample(port=redis.port, password=PASSWORD, db=99)
    assert not r.ok and "DB index is out of range" in r.reason, r


async def test_tls(certs, redis_factory) -> None:
    """tls = true verifies the server against ca_file; an unknown CA fails as `tls`; tls_verify = false skips it."""
    redis = redis_factory(tls=certs)
    assert (await sample(port=redis.port, tls=True, ca_file=certs.ca_file)).ok
    r = await sample(port=redis.port, tls=True)
    assert (r.ok, r.kind) == (False, "tls") and "certificate not accepted" in r.reason, r
    assert (await sample(port=redis.port, tls=True, tls_verify=False)).ok
    plain = await sample(port=redis.port)  # plain text to a TLS port: never a pass
    assert not plain.ok, plain

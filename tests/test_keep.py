"""Held connections (agent/probes/keep.py): a passing sample's connection stays open until the next sample,
so a dependency that dies is re-checked at once; a server that closes idle connections stops it for its
check; against real loopback sockets and a real redis-server."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from typing import Any

import pytest

from agent.probes import PROBES
from agent.probes.base import Context
from agent.probes.keep import Keeper
from agent.probes.redis import _client, _hold
from agent.runner import Runner
from tests.helpers import async_wait_for, wait_for
from tests.outage import wait_up


class Peer:
    """A loopback server that accepts connections and closes them when told, as a server going away does."""

    def __init__(self) -> None:
        self.writers: list[asyncio.StreamWriter] = []
        self.ended: list[bool] = []  # per connection: the client closed it

    async def start(self) -> Peer:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        i = len(self.ended)
        self.ended.append(False)
        await reader.read()
        self.ended[i] = True

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        n = len(self.writers)
        pair = await asyncio.open_connection("127.0.0.1", self.port)
        await async_wait_for(lambda: _true(len(self.writers) > n), timeout=5, what="accepted")
        return pair

    def drop(self, i: int = -1) -> None:
        self.writers[i].close()

    async def close(self) -> None:
        for w in self.writers:
            w.close()
        self.server.close()
        await self.server.wait_closed()


async def _true(value: bool) -> bool:
    return value


async def sample(keeper: Keeper, name: str, pair: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None) -> bool:
    """A sample of `name` as a probe makes it: release() first, then keep() the connection if it passed
    (`pair`), else nothing (it failed). True when the keeper holds the connection."""
    token = await keeper.release(name)
    if pair is None:
        return False
    reader, writer = pair

    async def close() -> None:
        writer.close()

    return keeper.keep(name, token, lambda: reader.read(1), writer.transport.abort, close)


@pytest.fixture
async def peer():
    p = await Peer().start()
    yield p
    await p.close()


async def test_a_dropped_connection_asks_for_a_sample_once(peer: Peer) -> None:
    """The server closing a held connection calls on_drop with the check's name, once; nothing is held then."""
    keeper, drops = Keeper(), []
    keeper.on_drop = drops.append
    assert await sample(keeper, "db", await peer.connect())
    assert keeper.holds("db")
    peer.drop()
    await async_wait_for(lambda: _true(drops == ["db"]), timeout=5, what="on_drop")
    assert not keeper.holds("db")
    await asyncio.sleep(0.05)  # nothing more may come: a bounded look, not a synchronisation
    assert drops == ["db"]


async def test_the_next_sample_closes_the_held_connection_first(peer: Peer) -> None:
    """A sample beginning (release) closes the held connection before it returns, so the sample never needs
    a second client slot beside it: the server sees the close first; our own close is not taken for the
    server's (no on_drop). close() (the agent stops) closes every one."""
    keeper, drops = Keeper(), []
    keeper.on_drop = drops.append
    assert await sample(keeper, "a", await peer.connect())
    assert await sample(keeper, "b", await peer.connect())
    await keeper.release("a")
    await async_wait_for(lambda: _true(peer.ended[0]), timeout=5, what="the server to see a's close")
    await keeper.close()
    await async_wait_for(lambda: _true(peer.ended[1]), timeout=5, what="the server to see b's close")
    await asyncio.sleep(0.05)
    assert drops == [] and not keeper.holds("a") and not keeper.holds("b")


async def test_a_server_that_closes_idle_connections_stops_the_holding(peer: Peer, caplog) -> None:
    """A drop whose re-check passes is the server closing idle connections: the check holds no connection
    after that (one log line says why), so it costs at most one extra sample; a reload (forget) re-arms it."""
    caplog.set_level(logging.INFO, logger="healthgate")
    keeper = Keeper()
    keeper.on_drop = lambda name: None
    assert await sample(keeper, "c", await peer.connect())
    peer.drop()
    await async_wait_for(lambda: _true(not keeper.holds("c")), timeout=5, what="the drop")
    pair = await peer.connect()
    assert not await sample(keeper, "c", pair)  # the re-check passes: not held, the caller closes it
    pair[1].close()
    assert [r.fields["check"] for r in caplog.records if r.getMessage() == "connection_hold_off"] == ["c"]
    pair = await peer.connect()
    assert not await sample(keeper, "c", pair)
    pair[1].close()
    keeper.forget("c")
    assert await sample(keeper, "c", await peer.connect())
    await keeper.close()


async def test_a_drop_that_a_failure_follows_keeps_the_holding(peer: Peer) -> None:
    """A drop whose re-check fails is an outage (or a restart): when the check passes again, its connection
    is held again, and the next drop asks for a sample again."""
    keeper, drops = Keeper(), []
    keeper.on_drop = drops.append
    assert await sample(keeper, "d", await peer.connect())
    peer.drop()
    await async_wait_for(lambda: _true(drops == ["d"]), timeout=5, what="the first drop")
    assert not await sample(keeper, "d", None)  # the re-check fails
    assert not await sample(keeper, "d", None)  # the confirmation fails too
    assert await sample(keeper, "d", await peer.connect())  # the dependency is back: this sample passes
    peer.drop()
    await async_wait_for(lambda: _true(drops == ["d", "d"]), timeout=5, what="the second drop")
    await keeper.close()


async def test_a_sample_overtaken_holds_nothing(peer: Peer) -> None:
    """keep() with the token of a sample that a newer one (a reload's first samples), a forget() (its check
    removed) or close() (the agent stopping) overtook holds nothing: no connection outlives them."""
    keeper = Keeper()
    old = await keeper.release("e")
    new = await keeper.release("e")
    pair = await peer.connect()
    assert not keeper.keep("e", old, lambda: pair[0].read(1), pair[1].transport.abort, _noop)
    pair = await peer.connect()
    assert keeper.keep("e", new, lambda: pair[0].read(1), pair[1].transport.abort, _noop)
    token = await keeper.release("f")
    keeper.forget("f")
    pair = await peer.connect()
    assert not keeper.keep("f", token, lambda: pair[0].read(1), pair[1].transport.abort, _noop)
    token = await keeper.release("g")
    await keeper.close()
    assert not keeper.holds("e")
    pair = await peer.connect()
    assert not keeper.keep("g", token, lambda: pair[0].read(1), pair[1].transport.abort, _noop)


async def test_a_failed_sample_discards_what_it_held(peer: Peer) -> None:
    """discard() (the runner found the sample failed after all: late, or leaking tasks) holds nothing."""
    keeper = Keeper()
    assert await sample(keeper, "h", await peer.connect())
    keeper.discard("h")
    assert not keeper.holds("h")
    await async_wait_for(lambda: _true(peer.ended[0]), timeout=5, what="the server to see the close")
    await keeper.close()


async def _noop() -> None:
    pass


async def test_no_more_are_held_than_the_limit(peer: Peer) -> None:
    """Past `limit` held connections a passing sample's is closed by its caller (keep() is False), so held
    connections never crowd out the samples' own sockets; the default limit is a quarter of RLIMIT_NOFILE."""
    import resource

    from agent.probes.keep import MAX_HELD, hold_limit

    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    assert hold_limit() == (MAX_HELD if soft == resource.RLIM_INFINITY else min(MAX_HELD, soft // 4))
    keeper = Keeper()
    keeper.limit = 2
    assert await sample(keeper, "a", await peer.connect()) and await sample(keeper, "b", await peer.connect())
    pair = await peer.connect()
    assert not await sample(keeper, "c", pair)
    pair[1].close()
    assert await sample(keeper, "a", await peer.connect())  # a check already holding one swaps it
    await keeper.close()


# -- the redis probe against a real server --------------------------------------------------------------


def clients(redis: Any) -> int:
    """Clients connected to `redis` but the redis-cli asking."""
    return len([line for line in redis.cli("CLIENT", "LIST").splitlines() if "cmd=client" not in line])


def redis_check(port: int, **keys: Any) -> Any:
    return PROBES["redis"].Config(**{"name": "cache", "type": "redis", "port": port, "timeout": "900ms", **keys})


async def test_redis_py_exposes_the_stream_and_transport_a_hold_needs(redis_factory) -> None:
    """The watch reads the stream redis-py's connection keeps and the abort is its transport's (private
    attributes): this redis-py has both, so an upgrade that moves them fails here instead of silently
    holding nothing."""
    redis = redis_factory()
    client = _client(redis_check(redis.port))
    try:
        conn = await client.connection_pool.get_connection()
        assert _hold(conn) is not None
    finally:
        await client.aclose()


async def test_a_passing_redis_sample_holds_one_idle_connection_until_the_next(redis_factory) -> None:
    """After each passing sample the server has exactly one client of ours: the sample's, held; the next
    sample closes it (never two left open); a failing sample holds none; the agent stopping closes it."""
    redis = redis_factory()
    ctx = Context()
    runner, check = Runner(ctx), redis_check(redis.port)
    for _ in range(3):
        assert (await runner.run(check)).ok
        assert ctx.keeper.holds("cache")
        wait_for(lambda: clients(redis) == 1, timeout=5, what="one held client")
    bad = redis_check(redis.port, password="wrong", name="bad")
    assert not (await runner.run(bad)).ok and not ctx.keeper.holds("bad")
    await ctx.close()
    wait_for(lambda: clients(redis) == 0, timeout=5, what="no client left")


async def test_a_killed_redis_is_seen_at_once_not_at_the_next_interval(start_agent, redis_factory) -> None:
    """A check sampled every 30 s goes DOWN within a few seconds of its redis being killed: the held
    connection's end starts the re-check at once, and the default quick confirmation (interval/5, here
    made 100 ms) confirms it. Without the held connection the next sample would be 30 s away."""
    redis = redis_factory()
    check = {"name": "cache", "type": "redis", "port": redis.port, "interval": "30s", "timeout": "500ms",
             "fast_interval": "100ms", "fall": 2, "rise": 1}
    agent = await start_agent({"checks": [check], "policy": {"flap_threshold": 0}})
    await wait_up(agent)
    await async_wait_for(lambda: _true(agent.agent.ctx.keeper.holds("cache")), timeout=5, what="a held connection")
    t0 = time.monotonic()
    await asyncio.to_thread(redis.proc.send_signal, signal.SIGKILL)
    await async_wait_for(lambda: _down(agent), timeout=5, interval=0.01, what="DOWN")
    assert time.monotonic() - t0 < 5
    assert "connection refused" in agent.state.snapshot.verdict.reason


async def _down(agent: Any) -> bool:
    return (await agent.get("/health"))[0] == 503


async def test_redis_closing_idle_clients_costs_one_extra_sample(redis_factory, caplog) -> None:
    """Against a redis that closes clients idle for a second (`timeout 1`), the check's held connection is
    dropped, the re-check passes, and the check stops holding: one log line, and the server's idle close
    no longer wakes it."""
    caplog.set_level(logging.INFO, logger="healthgate")
    redis = redis_factory(timeout="1")
    ctx = Context()
    drops: list[str] = []
    ctx.keeper.on_drop = drops.append
    runner, check = Runner(ctx), redis_check(redis.port)
    assert (await runner.run(check)).ok and ctx.keeper.holds("cache")
    await async_wait_for(lambda: _true(drops == ["cache"]), timeout=10, what="redis closing the idle client")
    assert (await runner.run(check)).ok  # the re-check passes: a false alarm
    assert not ctx.keeper.holds("cache")
    assert [r.fields["check"] for r in caplog.records if r.getMessage() == "connection_hold_off"] == ["cache"]
    assert (await runner.run(check)).ok and not ctx.keeper.holds("cache")
    await ctx.close()


async def test_stop_is_not_held_by_a_frozen_tls_redis(start_agent, redis_factory, certs) -> None:
    """The agent stopping (systemctl stop/restart) while its TLS redis is frozen (SIGSTOP, a stuck host) does
    not wait on that redis: the held connection is aborted, not closed politely (a TLS close_notify that
    the frozen server would never answer holds redis-py's disconnect for ssl_shutdown_timeout, 30 s)."""
    redis = redis_factory(tls=certs)
    check = {"name": "cache", "type": "redis", "port": redis.port, "tls": True, "ca_file": certs.ca_file,
             "interval": "30s", "timeout": "500ms", "rise": 1}
    agent = await start_agent({"checks": [check], "policy": {"flap_threshold": 0}})
    await wait_up(agent)
    await async_wait_for(lambda: _true(agent.agent.ctx.keeper.holds("cache")), timeout=5, what="a held connection")
    redis.proc.send_signal(signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        try:
            await asyncio.wait_for(agent.agent.stop(), 10)
        except TimeoutError:
            pass
        took = time.monotonic() - t0
        assert took < 3, f"the agent took {took:.1f} s to stop behind a frozen TLS redis"
    finally:
        redis.proc.send_signal(signal.SIGCONT)


async def test_the_held_connection_does_not_take_the_samples_own_slot(redis_factory) -> None:
    """A redis whose maxclients leaves the agent one client (here: maxclients 1) passes every sample: the held
    connection is closed before the next sample connects, so the agent's own idle client never takes the
    slot its sample needs (which would fail a healthy redis with `max number of clients reached`)."""
    redis = redis_factory(maxclients="1")
    ctx = Context()
    runner, check = Runner(ctx), redis_check(redis.port)
    try:
        results = []
        for _ in range(100):
            results.append(await runner.run(check))
            await asyncio.sleep(0.02)  # pacing, as an interval would: not a synchronisation
        failed = [r.reason for r in results if not r.ok]
        assert not failed, f"{len(failed)} of {len(results)} samples failed: {failed[0]}"
    finally:
        await ctx.close()


async def test_the_held_connections_watch_is_not_counted_as_the_probes_leak(redis_factory) -> None:
    """The watch of a held connection (and each close) is the keeper's task, not one the probe left behind:
    the runner does not count it against the check's LEAK_LIMIT, and so never cancels it as a leak (which
    the keeper would take for the server dropping the connection)."""
    redis = redis_factory()
    ctx = Context()
    runner = Runner(ctx)
    try:
        assert (await runner.run(redis_check(redis.port))).ok
        assert ctx.keeper.holds("cache")
        assert not runner.spawned["cache"], f"counted as the probe's: {runner.spawned['cache']}"
    finally:
        await ctx.close()

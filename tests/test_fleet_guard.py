"""The fleet guard against a real redis-server and a real etcd on loopback: the same tests for both stores."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import signal
import time
import urllib.request
from collections.abc import Awaitable, Callable

import aiohttp
import pytest

from agent.fleet.backends import open_store
from agent.fleet.budget import allowed_down, parse_max_down
from agent.fleet.etcd import EtcdStore, StoreError
from agent.fleet.store import Report
from tests.fleet import Fleet, StoreServer, fleet_config

pytestmark = pytest.mark.e2e


@pytest.fixture(params=["redis", "etcd"])
def store(request: pytest.FixtureRequest) -> StoreServer:
    factory = request.getfixturevalue("redis_factory" if request.param == "redis" else "etcd_factory")
    return StoreServer(request.param, factory)


async def until(pred: Callable[[], Awaitable[bool] | bool], timeout: float, what: str,
                check: Callable[[], None] | None = None, fleet: Fleet | None = None) -> None:
    """Poll `pred` every 10 ms until true; `check` runs at every poll (an invariant); fail at the deadline,
    with every guard's view when `fleet` is given."""
    deadline = time.monotonic() + timeout
    while True:
        if check is not None:
            check()
        got = pred()
        if isinstance(got, Awaitable):
            got = await got
        if got:
            return
        if time.monotonic() > deadline:
            views = "" if fleet is None else "; guards: " + fleet.describe()
            pytest.fail(f"timed out after {timeout}s waiting for {what}{views}")
        await asyncio.sleep(0.01)


async def all_registered(fleet: Fleet, n: int) -> bool:
    group = await fleet.group()
    return sum(1 for m in group.members if m.alive and m.status == "up") == n


async def test_script_and_python_agree_on_the_budget(store: StoreServer) -> None:
    """The store's figure of how many may be down is budget.allowed_down() for counts and shares alike."""
    for max_down, size in (("30%", 10), ("33.33%", 7), ("100%", 3), ("0%", 5), (2, 10), (4, 3), ("12.5%", 16)):
        cfg = fleet_config(store.url, max_down=max_down, size=size, group=f"g{size}{max_down}".replace("%", "p"))
        s = open_store(cfg)
        try:
            standing = await s.acquire(Report("a", "shed", ("db",)))
        finally:
            await s.close()
        assert standing.allowed == allowed_down(parse_max_down(max_down), size), (max_down, size)
        assert standing.expected == size


async def test_concurrent_grants_never_exceed_the_budget(store: StoreServer) -> None:
    """Twenty guards failing together, thirty rounds (fifteen on etcd, whose rounds are slower: the same
    transaction each time): never more than the budget granted (locally or in the store), the budget used
    every round, and every grant released when the reason clears."""
    n, rounds = 20, 30 if store.backend == "redis" else 15
    budget = allowed_down(parse_max_down("30%"), n)
    async with Fleet(store.url, n, max_down="30%", min_hold="0s") as fleet:
        await until(lambda: all_registered(fleet, n), 10, "all members registered")

        def bounded() -> None:
            assert fleet.count("granted") <= budget

        for r in range(rounds):
            fleet.observe(shared=("db",))  # one loop step: every guard wakes to ask at once
            await until(lambda: fleet.count("granted") == budget and fleet.count("held") == n - budget, 10,
                        f"round {r}: the budget used", bounded)
            group = await fleet.group()
            assert sum(1 for m in group.members if m.status == "shed") == budget, (r, group)
            assert group.serving == n - budget
            fleet.observe()
            assert fleet.count("none") == n  # at once, before any store call
            await until(lambda: all_registered(fleet, n), 10, f"round {r}: every grant released")


async def test_dead_members_count_as_not_serving(store: StoreServer) -> None:
    """Members that stopped beating still count in the expected size, never as serving: with 2 of 10
    silent and a budget of 3, only one more node may shed; a granted node that dies frees no slot."""
    n = 10
    async with Fleet(store.url, n, max_down=3) as fleet:
        await until(lambda: all_registered(fleet, n), 10, "all members registered")
        await fleet.stop(0)
        await fleet.stop(1)

        async def silent(k: int) -> bool:
            return sum(1 for m in (await fleet.group()).members if not m.alive) == k

        await until(lambda: silent(2), 10, "two members silent")
        fleet.observe(shared=("db",))
        await until(lambda: fleet.count("granted") == 1 and fleet.count("held") == n - 3, 10, "one grant")
        granted = next(i for i in fleet.running() if fleet.guards[i].view().state == "granted")
        assert (await fleet.group()).expected == n
        await fleet.stop(granted)
        await until(lambda: silent(3), 10, "the granted member silent")
        # Held nodes ask again every beat; a few beats show none of them gets the dead member's slot.
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            assert fleet.count("granted") == 0
            await asyncio.sleep(0.05)


@pytest.mark.parametrize("on_store_error", ["serve", "shed"])
async def test_store_killed_then_back_empty(store: StoreServer, on_store_error: str) -> None:
    """The store killed mid-outage: after the grace every node with shared reasons only is
    store_unavailable, serving or shedding as configured, and a local fault stays down; the store back
    empty: the bound holds again and the budget is used again."""
    n = 6
    async with Fleet(store.url, n, max_down=2, on_store_error=on_store_error) as fleet:
        await until(lambda: all_registered(fleet, n), 10, "all members registered")
        fleet.observe(shared=("db",), which=list(range(1, n)))
        fleet.observe(shared=("db",), local=("disk",), which=[0])
        await until(lambda: fleet.count("granted") == 1 and fleet.count("held") == n - 2, 10, "the budget used")
        store.kill()
        cfg = fleet.configs[0]
        # Bound: a grant lapses locally within ttl of the last confirmed beat; grace runs from the first failure.
        bound = cfg.ttl + cfg.grace + cfg.heartbeat + 1.0
        await until(lambda: fleet.count("store_unavailable") == n - 1, bound, "store_unavailable everywhere", fleet=fleet)
        views = fleet.views()
        assert views[0].state == "none" and not views[0].serve  # the local fault decides
        assert all(v.serve is (on_store_error == "serve") for v in views[1:])
        assert all(not v.store_ok for v in views)

        store.start_empty()

        def bounded() -> None:
            assert fleet.count("granted") <= 1

        await until(lambda: fleet.count("granted") == 1 and fleet.count("held") == n - 2, 15,
                    "the budget used again", bounded, fleet)
        group = await fleet.group()
        assert sum(1 for m in group.members if m.status == "shed") == 1
        assert next(m for m in group.members if m.node == "n00").status == "down"


async def test_release_on_clear_and_local_fault_overrides(store: StoreServer) -> None:
    """A granted node whose reason clears is `none` at once and released in the store within a beat; a held
    node that gets a local fault has serve=False at once, budget or not, and the store records it down."""
    n = 4
    async with Fleet(store.url, n, max_down=1) as fleet:
        await until(lambda: all_registered(fleet, n), 10, "all members registered")
        fleet.observe(shared=("db",))
        await until(lambda: fleet.count("granted") == 1 and fleet.count("held") == n - 1, 10, "one grant, 3 held")
        granted = next(i for i in fleet.running() if fleet.guards[i].view().state == "granted")
        held = next(i for i in fleet.running() if fleet.guards[i].view().state == "held")
        assert fleet.guards[held].view().serve and fleet.guards[held].view().reasons == ("db",)

        fleet.observe(which=[granted])
        assert fleet.guards[granted].view().state == "none"

        async def status_of(i: int, want: str) -> bool:
            group = await fleet.group()
            return next(m for m in group.members if m.node == f"n{i:02d}").status == want

        await until(lambda: status_of(granted, "up"), 2, "the grant released in the store")

        fleet.observe(shared=("db",), local=("disk",), which=[held])
        view = fleet.guards[held].view()
        assert view.state == "none" and not view.serve
        await until(lambda: status_of(held, "down"), 2, "the local fault recorded")


async def test_a_grant_is_never_reused_after_its_reason_cleared(store: StoreServer) -> None:
    """A granted node whose reason clears while the store is down (the release can't be sent) drops its
    copy of the grant at once: when the reason returns it is held, never granted without asking."""
    async with Fleet(store.url, 2, max_down=1) as fleet:
        await until(lambda: all_registered(fleet, 2), 10, "both members registered")
        fleet.observe(shared=("db",), which=[0])
        await until(lambda: fleet.guards[0].view().state == "granted", 10, "the grant")
        store.kill()
        fleet.observe(which=[0])
        fleet.observe(shared=("db",), which=[0])
        view = fleet.guards[0].view()
        assert view.state == "held" and view.serve
        assert fleet.guards[0].decisions["released"] == 1


class _FailsOnce(EtcdStore):
    """An etcd member whose `fail_at`-th request from now is lost on the wire (as a timeout is)."""

    fail_at = 0

    async def _post(self, path: str, body: dict) -> dict:
        self.fail_at -= 1
        if self.fail_at == 0:
            raise TimeoutError(f"{path}: lost")
        return await super()._post(path, body)


@pytest.mark.parametrize("lost", range(1, 7))
async def test_etcd_member_recovers_from_any_one_lost_call_after_an_empty_restart(etcd_factory, lost: int) -> None:
    """etcd back empty knows none of the member's leases: whichever one request of the re-registration is lost
    (the keepalive, the new lease, the born check, the seen lease, the write), the member's next beats make
    what is missing and it is recorded serving, never left writing to a lease the store no longer has."""
    server = etcd_factory()
    member = _FailsOnce(fleet_config(server.url, node="a"))
    try:
        await member.beat(Report("a", "up", ()))
        server.stop(signal.SIGKILL)
        server.start(fresh=True)
        with contextlib.suppress(OSError, aiohttp.ClientError):
            await member.beat(Report("a", "up", ()))  # the pooled connection to the old process
        member.fail_at = lost
        errors = []
        for _ in range(3):
            try:
                await member.beat(Report("a", "up", ()))
            except (OSError, aiohttp.ClientError, StoreError) as e:
                errors.append(repr(e))
        assert len(errors) <= 1, errors
        group = await member.members()
        assert [(m.node, m.status, m.alive) for m in group.members] == [("a", "up", True)]
        assert _keys(server, "/healthgate/fleet/g/born"), "the group's birth (its warm-up) marked again"
    finally:
        await member.close()


def _keys(server, prefix: str) -> list[str]:
    """The keys under `prefix` in etcd, read through its JSON gateway apart from the store under test."""
    end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
    body = json.dumps({"key": base64.b64encode(prefix.encode()).decode(),
                       "range_end": base64.b64encode(end.encode()).decode(), "keys_only": True}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{server.port}/v3/kv/range", data=body, method="POST")
    with urllib.request.urlopen(req, timeout=5) as resp:
        return [base64.b64decode(kv["key"]).decode() for kv in json.load(resp).get("kvs", [])]


async def test_etcd_member_recovers_when_the_store_restarts_between_keepalive_and_write(etcd_factory) -> None:
    """etcd restarting empty after the beat's keepalive found the leases alive and before its write: that
    write fails (the lease is gone), and the next beat makes both leases anew instead of writing to them."""
    server = etcd_factory()

    class RestartsBeforeWrite(EtcdStore):
        armed = False

        async def _post(self, path: str, body: dict) -> dict:
            if self.armed and path == "/v3/kv/txn":
                self.armed = False
                server.stop(signal.SIGKILL)
                server.start(fresh=True)
                await self.close()  # a new connection: the fault under test is the lost lease, not the socket
            return await super()._post(path, body)

    member = RestartsBeforeWrite(fleet_config(server.url, node="a"))
    try:
        await member.beat(Report("a", "up", ()))
        member.armed = True
        with pytest.raises(StoreError, match="lease not found"):
            await member.beat(Report("a", "down", ("disk",)))
        assert (await member.beat(Report("a", "down", ("disk",)))).status == "down"
        group = await member.members()
        assert [(m.node, m.status, m.alive) for m in group.members] == [("a", "down", True)]
    finally:
        await member.close()


class _LosesReply(EtcdStore):
    """An etcd member whose next write (a txn that puts) commits in the store but whose reply is lost."""

    armed = False

    async def _post(self, path: str, body: dict) -> dict:
        data = await super()._post(path, body)
        if self.armed and path == "/v3/kv/txn" and any("request_put" in op for op in body.get("success", [])):
            self.armed = False
            raise TimeoutError(f"{path}: reply lost")
        return data


async def test_etcd_a_write_whose_reply_was_lost_is_never_taken_as_written(etcd_factory) -> None:
    """A granted member re-checked and refused (another node went down meanwhile) records `held`; when etcd
    commits that write but the reply is lost, the member must not go on vouching for its grant from what it
    wrote before: its next beat asks the store again and is held, never shed past the budget."""
    server = etcd_factory()
    a = _LosesReply(fleet_config(server.url, node="a", max_down=1, size=2))
    b = EtcdStore(fleet_config(server.url, node="b", max_down=1, size=2))
    shed = Report("a", "shed", ("db",))
    try:
        await a.beat(Report("a", "up", ()))
        await b.beat(Report("b", "up", ()))
        deadline = time.monotonic() + 15
        while (await a.acquire(shed)).status != "shed":  # the group's warm-up (a ttl) first
            assert time.monotonic() < deadline, "never granted"
            await b.beat(Report("b", "up", ()))  # b's lease lives while it beats
            await asyncio.sleep(0.1)
        await b.beat(Report("b", "down", ("disk",)))  # one down already: the budget of 1 is spent
        a.armed = True
        with pytest.raises(TimeoutError):
            await a.acquire(shed)  # refused: the `held` write commits, its reply is lost
        assert (await a.beat(shed)).status == "held"
        assert {m.node: m.status for m in (await b.members()).members} == {"a": "held", "b": "down"}
    finally:
        await a.close()
        await b.close()

"""The fleet guard end to end: ten agent processes, one real store, one shared dependency, a real HAProxy."""

from __future__ import annotations

import csv
import io
import json
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.fleet import TIMINGS, StoreServer
from tests.helpers import AgentProcess, Dependency, free_port, require, toml_table, wait_for

pytestmark = pytest.mark.e2e

N, MAX_DOWN = 10, 3


def _code(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as resp:
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0  # dead or not answering


class Node:
    def __init__(self, tmp: Path, i: int, store: str, dep: int) -> None:
        self.name = f"n{i:02d}"
        self.heartbeat = tmp / f"{self.name}.alive"
        self.heartbeat.write_text("ok\n")
        self.agent_check = free_port()
        (tmp / self.name).mkdir()
        config = (toml_table("[server]", listen="127.0.0.1:{port}", shutdown_drain="0s",
                             trusted_networks=["127.0.0.1/32"])
                  + toml_table("[agent]", allow_root=True)
                  + toml_table("[agent_check]", listen=f"127.0.0.1:{self.agent_check}", weight_source="off")
                  + toml_table("[fleet]", store=store, group="web", node=self.name, max_down=MAX_DOWN, size=N,
                               **TIMINGS)
                  + toml_table("[[checks]]", name="db", type="tcp", port=dep, interval="200ms", timeout="150ms",
                               rise=1, fall=1)
                  + toml_table("[[checks]]", name="alive", type="file", path=str(self.heartbeat), interval="200ms",
                               timeout="150ms", rise=1, fall=1))
        self.proc = AgentProcess(tmp / self.name, config)

    def code(self) -> int:
        return _code(self.proc.port)

    def guard(self) -> str:
        """The node's fleet guard state as its /status says it ("none", "held", "granted", ...)."""
        req = urllib.request.Request(f"http://127.0.0.1:{self.proc.port}/status",
                                     headers={"Accept": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=2) as resp:
                body = json.loads(resp.read())
        except urllib.error.HTTPError as e:
            body = json.loads(e.read())
        return (body.get("guard") or {}).get("state", "none")


class HAProxy:
    def __init__(self, tmp: Path, nodes: list[Node]) -> None:
        self.sock = tmp / "haproxy.sock"
        servers = "\n".join(
            f"  server {n.name} 127.0.0.1:{free_port()} check port {n.proc.port} inter 200ms fall 1 rise 1 "
            f"agent-check agent-port {n.agent_check} agent-inter 200ms" for n in nodes)
        cfg = tmp / "haproxy.cfg"
        cfg.write_text(f"global\n  stats socket {self.sock} mode 600 level admin\ndefaults\n  mode http\n"
                       "  timeout connect 1s\n  timeout client 5s\n  timeout server 5s\n  timeout check 1s\n"
                       f"backend web\n  option httpchk GET /health\n  http-check expect status 200\n{servers}\n")
        self.log = open(tmp / "haproxy.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([require("haproxy", "haproxy"), "-db", "-f", str(cfg)], stdout=self.log,
                                     stderr=subprocess.STDOUT)
        wait_for(lambda: self.sock.exists(), what="haproxy stats socket")

    def down(self) -> int:
        """How many of the backend's servers HAProxy shows DOWN (or MAINT/DRAIN: out of rotation)."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(2)
            s.connect(str(self.sock))
            s.sendall(b"show stat\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        rows = csv.DictReader(io.StringIO(data.decode().lstrip("# ")))
        return sum(1 for r in rows if r["pxname"] == "web" and r["svname"] not in ("FRONTEND", "BACKEND")
                   and not r["status"].startswith("UP"))

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self.log.close()


class Watch:
    """Samples every agent's /health and HAProxy's view; fails the test the moment the bound is broken."""

    def __init__(self, nodes: list[Node], haproxy: HAProxy) -> None:
        self.nodes, self.haproxy = nodes, haproxy
        self.extra_down: set[str] = set()  # nodes allowed down besides the budget (local faults, killed)

    def sample(self) -> tuple[int, int]:
        down = sum(1 for n in self.nodes if n.name not in self.extra_down and n.code() != 200)
        lb = self.haproxy.down() - len(self.extra_down)
        assert down <= MAX_DOWN, f"{down} agents answer 503 for a shared reason (budget {MAX_DOWN})"
        assert lb <= MAX_DOWN, f"HAProxy shows {lb} servers DOWN for a shared reason (budget {MAX_DOWN})"
        return down, lb

    def until(self, pred, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pred(*self.sample()):
                return
        pytest.fail(f"timed out after {timeout}s waiting for {what}; last: {self.sample()}")

    def hold(self, seconds: float) -> None:
        """The bound holds at every sample for this long (the fault itself lasts this long)."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.sample()


@pytest.fixture
def fleet(tmp_path: Path, request: pytest.FixtureRequest):
    backend = request.param
    factory = request.getfixturevalue("redis_factory" if backend == "redis" else "etcd_factory")
    store = StoreServer(backend, factory)
    dep = Dependency()
    nodes = [Node(tmp_path, i, store.url, dep.port) for i in range(N)]
    for n in nodes:
        n.proc.start(wait=False)
    haproxy = None
    try:
        for n in nodes:
            wait_for(lambda n=n: n.code() == 200, timeout=60, what=f"{n.name} up")
        haproxy = HAProxy(tmp_path, nodes)
        yield store, dep, nodes, haproxy
    finally:
        if haproxy is not None:
            haproxy.stop()
        for n in nodes:
            n.proc.stop()
        dep.close()


@pytest.mark.parametrize("fleet", ["redis"], indirect=True)
def test_a_shared_outage_sheds_no_more_than_the_budget(fleet) -> None:
    """Ten agents behind a real HAProxy, one shared dependency, one Redis: when the dependency dies at no
    sample do more than max_down agents answer 503 nor does HAProxy show more DOWN, and the budget is
    used; a local fault on a held node takes it down at once although the budget is spent, and once it clears
    the node counts in the budget again (held or shed, never more than max_down); killing a shed
    agent frees no slot; with Redis killed the agents serve again, and with Redis back empty the bound
    holds again; with the dependency back every node is UP."""
    store, dep, nodes, haproxy = fleet
    watch = Watch(nodes, haproxy)
    watch.until(lambda down, lb: down == 0 and lb == 0, 20, "every node UP in HAProxy")

    dep.close()
    watch.until(lambda down, lb: down == MAX_DOWN and lb == MAX_DOWN, 10, "the budget used")
    watch.hold(2.0)

    held = next(n for n in nodes if n.code() == 200)
    held.heartbeat.unlink()  # its own fault: down at once, budget or not
    watch.extra_down.add(held.name)
    wait_for(lambda: held.code() == 503, timeout=2, what="the held node down for its local fault")
    watch.hold(1.0)
    held.heartbeat.write_text("ok\n")
    # Its own fault gone, the node fails for the shared reason only, and counts in the budget again: held
    # up, or shed with a grant. Both happen: while it was down for its own fault, four members were down,
    # and a shed member's next re-check (every min_hold) was refused, so that member serves again and the
    # slot goes to whichever of the two asks first.
    wait_for(lambda: held.guard() in ("held", "granted"), timeout=8, what="the node's own fault cleared")
    watch.extra_down.discard(held.name)
    watch.until(lambda down, lb: down == MAX_DOWN and lb == MAX_DOWN, 8, "the budget used again, the node counted")

    shed = next(n for n in nodes if n.code() == 503)
    shed.proc.proc.send_signal(signal.SIGKILL)
    shed.proc.proc.wait(5)
    watch.extra_down.add(shed.name)  # dead: the load balancer takes it out; it must free no slot
    nodes_alive = [n for n in nodes if n is not shed]
    watch.nodes = nodes_alive
    watch.hold(3.0)  # longer than the store's ttl: the dead member still counts as not serving

    store.kill()
    watch.until(lambda down, lb: down == 0, 10, "every live agent serving with the store gone (on_store_error=serve)")
    store.start_empty()
    watch.hold(4.0)  # the store came back empty: grants resume only within the bound

    dep.start()
    watch.until(lambda down, lb: down == 0 and lb == 0, 10, "every live node UP once the dependency returns")


@pytest.mark.parametrize("fleet", ["etcd"], indirect=True)
def test_the_same_outage_through_etcd(fleet) -> None:
    """The same shared outage with the group coordinated through a real etcd: never more than max_down
    DOWN at any sample, the budget used, and every node UP again once the dependency returns."""
    store, dep, nodes, haproxy = fleet
    watch = Watch(nodes, haproxy)
    watch.until(lambda down, lb: down == 0 and lb == 0, 20, "every node UP in HAProxy")
    dep.close()
    watch.until(lambda down, lb: down == MAX_DOWN and lb == MAX_DOWN, 15, "the budget used")
    watch.hold(2.0)
    dep.start()
    watch.until(lambda down, lb: down == 0 and lb == 0, 10, "every node UP once the dependency returns")


async def test_a_held_node_says_so_everywhere(start_agent, redis_factory) -> None:
    """A node held up by the guard answers 200 and `up` to the agent-check, and /status, /metrics and
    `healthgate explain` say it is held and why; a journal entry records the guard's transition."""
    import asyncio
    import json

    from agent.cli import render
    from tests.helpers import async_wait_for

    redis = redis_factory()
    dep = Dependency()
    agent = await start_agent({
        "agent_check": {"listen": "127.0.0.1:0", "weight_source": "off"},
        "fleet": {"store": f"redis://127.0.0.1:{redis.port}/0", "group": "web", "node": "a", "max_down": 0,
                  "size": 3, **TIMINGS},
        "checks": [{"name": "db", "type": "tcp", "port": dep.port, "interval": "200ms", "timeout": "150ms",
                    "rise": 1, "fall": 1}]})

    async def code() -> int:
        return (await agent.get("/health"))[0]

    await async_wait_for(lambda: _is(code, 200), what="up")
    dep.close()
    await async_wait_for(lambda: _guard_state(agent, "held"), what="held")
    assert await code() == 200
    reader, writer = await asyncio.open_connection(*agent.agent.agent_check_address)
    reply = (await asyncio.wait_for(reader.readline(), 3)).decode()
    writer.close()
    assert reply.startswith("up ready 100% #held by the fleet guard: db failing"), reply
    body = json.loads((await agent.get("/status", headers={"Accept": "application/json"}))[1])
    assert body["status"] == "pass" and body["guard"]["state"] == "held" and body["guard"]["reasons"] == ["db"]
    assert body["output"].startswith("held by the fleet guard: db failing")
    assert render.explain(body).split(": db failing")[0].endswith("is UP, held by the fleet guard")
    metrics = (await agent.get("/metrics"))[1]
    assert 'healthgate_fleet_guard_state{group="web",state="held"} 1.0' in metrics
    assert any(e["kind"] == "guard" and e["to"] == "held" for e in agent.state.journal)
    dep.start()
    await async_wait_for(lambda: _guard_state(agent, "none"), what="released")


async def _is(code, want: int) -> bool:
    return await code() == want


async def _guard_state(agent, state: str) -> bool:
    guard = agent.state.condition.guard
    return guard is not None and guard.state == state


@pytest.mark.parametrize("backend", ["redis", "etcd"])
async def test_each_verdict_group_has_its_own_budget(start_agent, backend: str, request: pytest.FixtureRequest,
                                                     tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """With [fleet] and verdict groups, each group's budget is counted apart in the store (`shop:api`,
    `shop:static`): while another node sheds api (using api's one allowed DOWN), this node's api, failing for a
    shared reason, is held UP, and its static group, failing for a shared reason too, is shed, since no
    node spent static's budget; the node's own verdict and budget are untouched. `fleet status --group
    static` lists static's members."""
    import asyncio
    import json

    from agent.fleet.backends import open_store
    from agent.fleet.config import FleetConfig
    from agent.fleet.guard import FleetGuard
    from tests.helpers import async_wait_for

    server = StoreServer(backend, request.getfixturevalue(f"{backend}_factory"))
    fleet = {"store": server.url, "group": "shop", "max_down": 1, "size": 2, **TIMINGS}
    db, web = Dependency(), Dependency()

    def dep(name: str, port: int) -> dict:
        return {"name": name, "type": "tcp", "port": port, "interval": "200ms", "timeout": "150ms", "rise": 1,
                "fall": 1, "critical": False}

    agent = await start_agent({
        "fleet": {**fleet, "node": "a"},
        "checks": [{"name": "mem", "type": "memory", "interval": "200ms", "timeout": "100ms", "rise": 1,
                    "max_used_percent": 100}, dep("db", db.port), dep("web", web.port)],
        "groups": {"api": {"checks": ["db"]}, "static": {"checks": ["web"]}}})

    async def codes() -> list[int]:
        return [(await agent.get(p))[0] for p in ("/health", "/health/api", "/health/static")]

    async def are(want: list[int]) -> bool:
        return await codes() == want

    await async_wait_for(lambda: are([200, 200, 200]), what="all up")
    other = FleetConfig.model_validate({**fleet, "node": "b"})
    b_api, b_static = FleetGuard(other.for_verdict_group("api")), FleetGuard(other.for_verdict_group("static"))
    now = asyncio.get_running_loop().time()
    b_api.observe(("db",), (), now)  # node b sheds api for the shared database...
    b_static.observe((), (), now)  # ...and serves static
    tasks = [asyncio.create_task(b_api.run()), asyncio.create_task(b_static.run())]
    stores = [open_store(FleetConfig.model_validate({**fleet, "node": "x"})), open_store(other.for_verdict_group("static"))]
    try:
        async def b_shed() -> bool:
            return b_api.view().state == "granted"

        await async_wait_for(b_shed, timeout=15, what="b holds api's one grant")
        db.close()
        web.close()

        async def held_and_shed():
            body = json.loads((await agent.get("/status", headers={"Accept": "application/json"}))[1])
            groups = body["groups"]
            states = (groups["api"]["guard"]["state"], groups["static"]["guard"]["state"])
            known = groups["api"]["guard"]["budget"] is not None  # an etcd beat reads no figures: a request does
            return body if states == ("held", "granted") and known else None

        body = await async_wait_for(held_and_shed, timeout=15, what="api held, static shed")
        assert await codes() == [200, 200, 503]
        api = body["groups"]["api"]
        assert api["guard"]["group"] == "shop:api" and api["guard"]["budget"] == 1
        assert api["output"].startswith("held by the fleet guard: db failing")
        from agent.cli import render

        assert render.group_reason(api).startswith("held by the fleet guard: db failing")
        assert ", held by the fleet guard: db failing" in render.explain_group(body, "api")
        assert body["groups"]["static"]["guard"]["group"] == "shop:static"
        assert body["guard"]["state"] == "none" and body["guard"]["group"] == "shop"
        node, static = [await s.members() for s in stores]
        assert {m.node: m.status for m in node.members} == {"a": "up"}  # the node's budget: nobody shed
        assert {m.node: m.status for m in static.members} == {"a": "shed", "b": "up"}
        from agent.cli import main as cli

        path = tmp_path / "fleet.toml"
        path.write_text(toml_table("[agent]", allow_root=True) + toml_table("[fleet]", **{**fleet, "node": "a"})
                        + toml_table("[[checks]]", name="mem", type="memory") + '\n[groups.static]\nchecks = ["mem"]\n')
        capsys.readouterr()
        argv = ["fleet", "status", "-c", str(path), "--json", "--group"]
        assert await asyncio.to_thread(cli.main, [*argv, "static"]) == 0
        doc = json.loads(capsys.readouterr().out)
        assert doc["group"] == "shop:static"
        assert {m["node"]: m["status"] for m in doc["members"]} == {"a": "shed", "b": "up"}
        assert await asyncio.to_thread(cli.main, [*argv, "apl"]) == 2
        assert "--group: no group named 'apl' in groups (known: static)" in capsys.readouterr().err
        db.start()
        web.start()
        await async_wait_for(lambda: are([200, 200, 200]), timeout=10, what="all up again")
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for s in stores:
            await s.close()
        db.close()
        web.close()


async def test_a_reload_keeps_the_guards_of_the_groups_it_keeps(start_agent, redis_factory, tmp_path: Path) -> None:
    """A reload that adds a verdict group starts that group's guard and one that removes a group stops its
    guard, while the node's guard and the kept groups' guards go on (their grants with them)."""
    from tests.helpers import async_wait_for

    redis = redis_factory()
    fleet = {"store": f"redis://127.0.0.1:{redis.port}/0", "group": "shop", "node": "a", **TIMINGS}
    mem = {"name": "mem", "type": "memory", "interval": "200ms", "timeout": "100ms", "rise": 1, "max_used_percent": 100}
    agent_keys = {"allow_root": True, "watch_config": False, "state_dir": str(tmp_path / "state")}
    path = tmp_path / "c.toml"

    def config(*groups: str) -> str:
        return (toml_table("[agent]", **agent_keys) + toml_table("[fleet]", **fleet) + toml_table("[[checks]]", **mem)
                + "".join(f'\n[groups.{g}]\nchecks = ["mem"]\n' for g in groups))

    path.write_text(config("api"))
    agent = await start_agent({"agent": agent_keys, "fleet": fleet, "checks": [mem],
                               "groups": {"api": {"checks": ["mem"]}}}, config_path=str(path))
    node, api = agent.state.guard, agent.state.group_guards["api"]

    async def views(*names: str) -> bool:
        return list(agent.state.condition.group_guards) == list(names)

    await async_wait_for(lambda: views("api"), what="api's guard observed")
    path.write_text(config("api", "static"))
    assert await agent.agent.reload() is True
    assert agent.state.guard is node and agent.state.group_guards["api"] is api
    assert list(agent.state.group_guards) == ["api", "static"]
    await async_wait_for(lambda: views("api", "static"), what="static's guard observed")
    path.write_text(config("static"))
    assert await agent.agent.reload() is True
    assert agent.state.guard is node and list(agent.state.group_guards) == ["static"]
    await async_wait_for(lambda: views("static"), what="api's guard gone")

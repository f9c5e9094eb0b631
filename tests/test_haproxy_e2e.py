"""The real HAProxy 2.6 follows the agent: httpchk on /health plus agent-check, read back through its stats socket."""

from __future__ import annotations

import asyncio
import csv
import io
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from agent.app import Agent
from agent.config import parse_config
from tests.docs import blocks, page
from tests.helpers import ROOT, free_port, require, wait_for
from tests.test_lifecycle import MEM as TOML_MEM

pytestmark = pytest.mark.e2e

# show servers state: srv_admin_state bits (HAProxy's SRV_ADMF_*)
FMAINT, FDRAIN = 0x01, 0x08
# show servers state: srv_op_state (SRV_ST_*)
STOPPED, RUNNING, STOPPING = 0, 2, 3

BACKENDS = """
global
  stats socket {sock} mode 600 level admin
defaults
  mode http
  timeout connect 1s
  timeout client 5s
  timeout server 5s
  timeout check 1s
backend hard
  option httpchk GET /health
  http-check expect status 200
  server n1 127.0.0.1:{app} check port {http} inter 250ms fall 2 rise 2 weight 100 agent-check agent-port {agent} agent-inter 250ms
backend soft
  option httpchk GET /health
  http-check disable-on-404
  http-check expect status 200
  server n1 127.0.0.1:{app} check port {http} inter 250ms fall 2 rise 2 weight 100 agent-check agent-port {agent} agent-inter 250ms
"""


class HAProxy:
    """A real haproxy with an admin stats socket; `servers()` is its own view of server n1 per backend."""

    def __init__(self, tmp: Path, http: int, agent: int, backends: str = BACKENDS):
        self.sock = tmp / "haproxy.sock"
        self.cfg = tmp / "haproxy.cfg"
        self.cfg.write_text(backends.format(sock=self.sock, app=free_port(), http=http, agent=agent))
        self.log = tmp / "haproxy.log"
        binary = require("haproxy", "haproxy")
        self._log = open(self.log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([binary, "-db", "-f", str(self.cfg)], stdout=self._log,
                                     stderr=subprocess.STDOUT)

    async def command(self, cmd: str) -> str:
        reader, writer = await asyncio.open_unix_connection(str(self.sock))
        try:
            writer.write(cmd.encode() + b"\n")
            return (await asyncio.wait_for(reader.read(), 2)).decode()
        finally:
            writer.close()

    async def servers(self) -> dict[str, dict[str, str]]:
        """backend -> HAProxy's fields for n1: status and weight (show stat), op/admin state (show servers state)."""
        stat = (await self.command("show stat")).lstrip("# ")
        out = {r["pxname"]: {"status": r["status"], "weight": r["weight"], "agent": r["last_agt"],
                             "check": r["last_chk"]}
               for r in csv.DictReader(io.StringIO(stat)) if r["svname"] == "n1"}
        lines = (await self.command("show servers state")).splitlines()
        header = next(line for line in lines if line.startswith("# be_id")).lstrip("# ").split()
        for line in lines[1:]:  # the first line is the format version
            if line and line[0].isdigit():
                row = dict(zip(header, line.split(), strict=False))
                out[row["be_name"]].update(op=int(row["srv_op_state"]), admin=int(row["srv_admin_state"]))
        return out

    async def wait(self, pred: Callable[[dict[str, dict[str, str]]], bool], timeout: float, what: str) -> float:
        """Seconds until `pred(servers())` holds; fails the test at the deadline with HAProxy's last view."""
        t0 = time.monotonic()
        last: object = None
        while time.monotonic() - t0 < timeout:
            try:
                last = await self.servers()
                if pred(last):
                    return time.monotonic() - t0
            except (TimeoutError, OSError, StopIteration, KeyError) as e:
                last = e
            await asyncio.sleep(0.05)
        pytest.fail(f"HAProxy: timed out after {timeout}s waiting for {what}; last view: {last!r}\n"
                    + self.log.read_text(errors="replace")[-2000:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()


@pytest.fixture
def haproxy(tmp_path: Path):
    started: list[HAProxy] = []

    def start(http: int, agent: int, backends: str = BACKENDS) -> HAProxy:
        h = HAProxy(tmp_path, http, agent, backends)
        started.append(h)
        wait_for(lambda: h.sock.exists() or h.proc.poll() is not None, timeout=10, what="haproxy stats socket")
        assert h.proc.poll() is None, h.log.read_text()
        return h

    yield start
    for h in started:
        h.stop()


class Dependency:
    """A tiny TCP listener the agent's tcp check connects to; stop() kills it, start() brings it back."""

    def __init__(self) -> None:
        self.port = free_port()
        self.server: asyncio.Server | None = None

    async def start(self) -> None:
        async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.close()

        self.server = await asyncio.start_server(accept, "127.0.0.1", self.port, reuse_address=True)

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()
        self.server = None


@pytest.fixture
async def dependency() -> AsyncIterator[Dependency]:
    dep = Dependency()
    await dep.start()
    yield dep
    if dep.server is not None:
        await dep.stop()


@pytest.fixture
def fixture_proc(tmp_path: Path) -> Path:
    """A /proc with 4 CPUs and a load of 1.0: 75% headroom, so the agent advertises 75%."""
    proc = tmp_path / "proc"
    proc.mkdir()
    cpus = "".join(f"cpu{i} 10 0 10 80 0 0 0 0 0 0\n" for i in range(4))
    (proc / "stat").write_text("cpu  40 0 40 320 0 0 0 0 0 0\n" + cpus)
    (proc / "loadavg").write_text("1.00 1.00 1.00 1/100 4242\n")
    return proc


def is_up(weight: str) -> Callable[[dict], bool]:
    return lambda s: all(v["status"] == "UP" and v["op"] == RUNNING and v["weight"] == weight for v in s.values())


async def cli(*args: str) -> None:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "agent", *args, cwd=ROOT,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, (out + err).decode()
    assert not err, err.decode()  # the running agent confirmed it


async def test_haproxy_follows_verdict_weight_drain_and_maint(haproxy, dependency: Dependency, fixture_proc: Path,
                                                              tmp_path: Path) -> None:
    """HAProxy shows UP with the agent's weight, DOWN within the bound when a dependency dies and UP when it
    returns, DRAIN (hard: DOWN, soft with disable-on-404: NOLB) in drain, and MAINT in maintenance."""
    state_dir = tmp_path / "state"
    cfg_file = tmp_path / "healthgate.toml"
    cfg = parse_config({
        "server": {"listen": "127.0.0.1:0", "drain_status": 404},
        "agent": {"state_dir": str(state_dir)},
        "agent_check": {"listen": "127.0.0.1:0", "weight_source": "load", "slow_start": 0},
        "checks": [{"name": "db", "type": "tcp", "port": dependency.port, "interval": "200ms",
                    "timeout": "150ms", "fall": 2, "rise": 2}],
    })
    agent = Agent(cfg)
    agent.ctx.proc = fixture_proc
    await agent.start()
    try:
        cfg_file.write_text(f'[server]\nlisten = "127.0.0.1:{agent.address[1]}"\n'
                            f'[agent]\nallow_root = true\nstate_dir = "{state_dir}"\n' + TOML_MEM % "mem")
        h = haproxy(agent.address[1], agent.agent_check_address[1])
        await h.wait(is_up("75"), timeout=10, what="UP with weight 75")

        await dependency.stop()
        took = await h.wait(lambda s: all(v["op"] == STOPPED for v in s.values()), timeout=5, what="DOWN")
        # The bound: fall x interval for the check (0.4 s) + one agent-inter (0.25 s); 3 s leaves room for noise.
        assert took < 3.0, took
        view = await h.servers()
        assert "db: tcp 127.0.0.1" in view["hard"]["agent"] and "connection refused" in view["hard"]["agent"]
        print(f"\nHAProxy DOWN {took * 1000:.0f} ms after the dependency died")

        await dependency.start()
        took = await h.wait(is_up("75"), timeout=5, what="UP again")
        print(f"HAProxy UP {took * 1000:.0f} ms after the dependency returned")

        await cli("drain", "-c", str(cfg_file), "--reason", "deploy 42")
        await h.wait(lambda s: all(v["admin"] & FDRAIN for v in s.values())
                     and s["hard"]["op"] == STOPPED and s["soft"]["op"] == STOPPING
                     and s["soft"]["status"] == "NOLB", timeout=5, what="DRAIN (hard and soft)")
        assert "deploy 42" in (await h.servers())["soft"]["agent"]

        await cli("ready", "-c", str(cfg_file))
        await h.wait(lambda s: is_up("75")(s) and not any(v["admin"] for v in s.values()), timeout=5,
                     what="READY and UP")

        await cli("maint", "-c", str(cfg_file), "--reason", "kernel update")
        await h.wait(lambda s: all(v["status"] == "MAINT" and v["admin"] & FMAINT for v in s.values()), timeout=5,
                     what="MAINT")

        await cli("ready", "-c", str(cfg_file))
        await h.wait(is_up("75"), timeout=5, what="UP after maintenance")
    finally:
        await agent.stop()


AGENT = """
[server]
listen = "127.0.0.1:{port}"
[agent]
allow_root = true
[agent_check]
listen = "127.0.0.1:%d"
weight_source = "off"
""" + TOML_MEM % "mem"


async def test_haproxy_marks_down_when_the_agent_is_killed(haproxy, agent_process) -> None:
    """SIGKILL of the agent process takes the node DOWN in HAProxy: httpchk fails even though the
    agent-check's last word was up."""
    agent_port = free_port()
    agent = await asyncio.to_thread(agent_process, AGENT % agent_port)
    h = haproxy(agent.port, agent_port)
    await h.wait(is_up("100"), timeout=10, what="UP")
    agent.proc.send_signal(signal.SIGKILL)
    took = await h.wait(lambda s: all(v["status"].startswith("DOWN") for v in s.values()), timeout=5,
                        what="DOWN")
    assert took < 3.0, took  # fall 2 x inter 250 ms, plus noise
    print(f"\nHAProxy DOWN {took * 1000:.0f} ms after SIGKILL of the agent")


def test_deploy_config_is_valid(tmp_path: Path) -> None:
    """deploy/haproxy/haproxy.cfg passes `haproxy -c`."""
    binary = require("haproxy", "haproxy")
    proc = subprocess.run([binary, "-c", "-f", str(ROOT / "deploy" / "haproxy" / "haproxy.cfg")],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_readme_backend_is_the_deploy_config() -> None:
    """The backend the README and docs/haproxy.md tell users to copy is the one in deploy/haproxy/haproxy.cfg
    that `haproxy -c` checks."""
    deployed = {line.strip() for line in (ROOT / "deploy" / "haproxy" / "haproxy.cfg").read_text().splitlines()}
    for name in ("README.md", "docs/haproxy.md"):
        backend = blocks(page(name), "haproxy")
        assert backend, f"{name} shows no haproxy backend"
        missing = [line for line in backend[0].splitlines() if line.strip() and line.strip() not in deployed]
        assert not missing, (name, missing)

"""Fixtures shared by every test: an in-process agent and a subprocess agent, both on free loopback ports."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from agent.app import Agent
from agent.config import parse_config
from agent.runner import Runner
from tests.helpers import AgentProcess, Dependency

pytest_plugins = ["tests.servers"]  # real servers (redis, PostgreSQL, TLS, DNS, blackhole) as fixtures


class RunningAgent:
    def __init__(self, agent: Agent, session: aiohttp.ClientSession):
        self.agent = agent
        self.session = session
        host, port = agent.address
        self.url = f"http://{host}:{port}"

    @property
    def state(self):
        return self.agent.state

    async def get(self, path: str, **kw: Any) -> tuple[int, str]:
        async with self.session.get(self.url + path, **kw) as resp:
            return resp.status, await resp.text()


@pytest.fixture
async def start_agent(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """Start an Agent in this event loop from a config dict; listen is forced to 127.0.0.1:0, loopback is
    trusted with details unless the config says otherwise, and the state directory defaults to the test's own."""
    started: list[RunningAgent] = []
    session = aiohttp.ClientSession()

    async def start(data: dict[str, Any], probes: dict | None = None) -> RunningAgent:
        data = {**data, "server": {"trusted_networks": ["127.0.0.1/32"], **data.get("server", {}),
                                   "listen": "127.0.0.1:0"},
                "agent": {"state_dir": str(tmp_path / "state"), **data.get("agent", {})}}
        cfg = parse_config(data)
        agent = Agent(cfg)
        if probes is not None:
            agent.runner = Runner(agent.ctx, probes)
        await agent.start()
        running = RunningAgent(agent, session)
        started.append(running)
        return running

    yield start
    for r in started:
        await r.agent.stop()
    await session.close()
    await asyncio.sleep(0)


@pytest.fixture
def agent_process(tmp_path: Path) -> Iterator[Callable[..., AgentProcess]]:
    """Start `healthgate run` as a subprocess; killed at teardown."""
    procs: list[AgentProcess] = []

    def start(config: str, wait: bool = True, **kw: Any) -> AgentProcess:
        p = AgentProcess(tmp_path, config, **kw)
        procs.append(p)
        return p.start(wait=wait)

    yield start
    for p in procs:
        p.stop()


@pytest.fixture
def dependency() -> Iterator[Dependency]:
    """A TCP server for a check to depend on; `dependency.close()` makes the check fail."""
    dep = Dependency()
    yield dep
    if dep.thread.is_alive():
        dep.close()

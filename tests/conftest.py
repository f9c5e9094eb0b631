"""Fixtures shared by every test: an in-process agent and a subprocess agent, both on free loopback ports."""

from __future__ import annotations

import asyncio
import faulthandler
import gc
import importlib.util
import io
import os
import platform
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

import agent as agent_package
from agent.app import Agent
from agent.config import parse_config
from agent.runner import Runner
from tests.helpers import LOOP, ROOT, AgentProcess, Dependency, loop_in_use

pytest_plugins = ["tests.servers"]  # real servers (redis, PostgreSQL, TLS, DNS, blackhole) as fixtures

# The engine and serving tests: what decides and what answers. CI runs them on every supported Python with
# both event loops, and against a plain install (`make pythons`, `make test-plain`); `-m serving` selects them.
SERVING = frozenset({
    "test_engine", "test_starvation", "test_faults_deps",  # checks to verdict, under stress
    "test_fasthealth", "test_http_params", "test_haproxy_agent", "test_admin", "test_cli_status",  # serving
    "test_lifecycle", "test_hostile", "test_config_faults",  # the agent as a process
})


def pytest_configure(config: pytest.Config) -> None:
    if loop_in_use() == "uvloop" and importlib.util.find_spec("uvloop") is None:
        raise pytest.UsageError(f"HEALTHGATE_LOOP={LOOP}, but uvloop is not installed (the fast extra)")
    where = Path(agent_package.__file__).resolve()
    # `make test-plain` runs against the installed package: a checkout on sys.path would test the wrong copy.
    if os.environ.get("HEALTHGATE_INSTALLED") == "1" and where.is_relative_to(ROOT / "agent"):
        raise pytest.UsageError(f"HEALTHGATE_INSTALLED=1, but agent is imported from the checkout: {where}")


def pytest_sessionstart(session: pytest.Session) -> None:
    """HEALTHGATE_SUITE_DEADLINE (seconds; CI sets it a little inside each step's budget): a run still going
    then writes every thread's stack to tests/artifacts/stacks.txt and ends with an error, so a hang that
    the per-test timeout cannot break (a fixture's teardown after a timeout, a C call) says where it is
    instead of being killed mute."""
    deadline = os.environ.get("HEALTHGATE_SUITE_DEADLINE")
    if deadline:
        _SUITE_DEADLINE.append(time.monotonic() + float(deadline))
        _arm_suite_deadline()


_SUITE_DEADLINE: list[float] = []
STACKS = ROOT / "tests" / "artifacts" / "stacks.txt"  # where a hung run's stacks go: .ci/run prints them


def _stacks_file() -> Any:
    """A file outside pytest's capture (which holds fd 2 while a test runs), opened once and kept open."""
    if not _STACKS:
        STACKS.parent.mkdir(parents=True, exist_ok=True)
        _STACKS.append(open(STACKS, "w"))  # noqa: SIM115 - open until the process ends, for faulthandler
    return _STACKS[0]


_STACKS: list[Any] = []


def _arm_suite_deadline() -> None:
    if _SUITE_DEADLINE:
        faulthandler.dump_traceback_later(max(1.0, _SUITE_DEADLINE[0] - time.monotonic()), exit=True,
                                          file=_stacks_file())


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    """In CI (HEALTHGATE_SUITE_DEADLINE set), a test still running 10 s before its timeout has the stacks of
    its event loop's tasks written to tests/artifacts/stacks.txt: the timeout's own dump shows threads only,
    and a hung asyncio test is a loop idle in its selector, whatever task waits forever."""
    timer = None
    if _SUITE_DEADLINE:
        marker = item.get_closest_marker("timeout")
        limit = float(marker.args[0]) if marker and marker.args else float(item.config.getini("timeout") or 0)
        if limit > 20:
            timer = threading.Timer(limit - 10, _dump_tasks, (item.nodeid,))
            timer.daemon = True
            timer.start()
    yield
    if timer is not None:
        timer.cancel()


def _dump_tasks(nodeid: str) -> None:
    out = _stacks_file()
    print(f"=== {nodeid}: asyncio tasks 10 s before its timeout", file=out)
    for obj in gc.get_objects():
        if isinstance(obj, asyncio.AbstractEventLoop) and obj.is_running():
            for task in list(asyncio.all_tasks(obj)):
                buf = io.StringIO()
                task.print_stack(limit=25, file=buf)
                print(buf.getvalue(), file=out)
    out.flush()


def pytest_runtest_logfinish() -> None:
    """pytest cancels faulthandler's timer when a test fails (before it would enter the debugger): armed again."""
    _arm_suite_deadline()


def pytest_unconfigure(config: pytest.Config) -> None:
    """Past the summary nothing should keep the process alive, but a thread still blocked (a lookup on a dead
    resolver, a read on a hung mount) would hold the interpreter's exit, and with it the run, for good:
    two minutes on, every thread's stack is written to tests/artifacts/stacks.txt and the process ends with
    an error instead."""
    if _SUITE_DEADLINE:
        faulthandler.dump_traceback_later(120, exit=True, file=_stacks_file())


def pytest_report_header(config: pytest.Config) -> str:
    return (f"healthgate: Python {platform.python_version()}, loop {loop_in_use()} (HEALTHGATE_LOOP={LOOP}), "
            f"agent from {Path(agent_package.__file__).parent}")


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Callable[[], Any]]:
    if loop_in_use() == "uvloop":
        import uvloop

        return {"uvloop": uvloop.new_event_loop}
    return {"asyncio": asyncio.new_event_loop}


@pytest.hookimpl(tryfirst=True)  # before -m deselects
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.stem in SERVING:
            item.add_marker(pytest.mark.serving)


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

    async def start(data: dict[str, Any], probes: dict | None = None, config_path: str | None = None) -> RunningAgent:
        data = {**data, "server": {"trusted_networks": ["127.0.0.1/32"], **data.get("server", {}),
                                   "listen": "127.0.0.1:0"},
                "agent": {"state_dir": str(tmp_path / "state"), **data.get("agent", {})}}
        cfg = parse_config(data)
        agent = Agent(cfg, config_path)  # config_path: the file a reload reads
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

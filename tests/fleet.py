"""Fleet guard test parts: a real store (redis-server or etcd) that can be killed and brought back empty,
and a group of in-process guards sharing it."""

from __future__ import annotations

import asyncio
import random
import signal
from collections.abc import Callable
from typing import Any

from agent.fleet.backends import open_store
from agent.fleet.config import FleetConfig
from agent.fleet.guard import FleetGuard, GuardView
from agent.fleet.store import Group, Store

# Short timings so a test takes seconds; etcd grants no lease shorter than 2 s, hence ttl.
TIMINGS = {"heartbeat": "250ms", "ttl": "2s", "timeout": "200ms", "grace": "1s", "min_hold": "1s", "jitter": "0s"}


class StoreServer:
    """One real store of either backend: `url`, kill() (SIGKILL), start_empty() (same port, no data)."""

    def __init__(self, backend: str, factory: Callable[..., Any]):
        self.backend = backend
        self.server = factory()

    @property
    def url(self) -> str:
        if self.backend == "redis":
            return f"redis://127.0.0.1:{self.server.port}/0"
        return self.server.url

    def kill(self) -> None:
        if self.backend == "redis":
            self.server.proc.send_signal(signal.SIGKILL)
            self.server.proc.wait(10)
            self.server.proc = None
        else:
            self.server.stop(signal.SIGKILL)

    def start_empty(self) -> None:
        if self.backend == "redis":
            self.server.start()  # no persistence: it comes back empty
        else:
            self.server.start(fresh=True)


def fleet_config(url: str, **keys: Any) -> FleetConfig:
    return FleetConfig.model_validate({"store": url, "group": "g", "node": "n0", **TIMINGS, **keys})


class Fleet:
    """`n` guards of one group, each with its own store connection and run() task."""

    def __init__(self, url: str, n: int, **keys: Any):
        self.configs = [fleet_config(url, **{**keys, "node": f"n{i:02d}"}) for i in range(n)]
        self.guards = [FleetGuard(c, rng=random.Random(i)) for i, c in enumerate(self.configs)]
        self.tasks: list[asyncio.Task | None] = []
        self.admin: Store = open_store(self.configs[0])

    async def __aenter__(self) -> Fleet:
        self.tasks = [asyncio.create_task(g.run(), name=f"guard-{i}") for i, g in enumerate(self.guards)]
        return self

    async def __aexit__(self, *exc: object) -> None:
        for i in range(len(self.tasks)):
            await self.stop(i)
        await self.admin.close()

    async def stop(self, i: int) -> None:
        """The guard's agent dies: its task ends without a word to the store."""
        task = self.tasks[i]
        if task is not None:
            task.cancel()
            # Bounded: a guard that cannot end (its store's close stuck) fails the test, naming it, instead
            # of holding the run.
            done, _ = await asyncio.wait([task], timeout=10)
            assert done, f"guard {i} still running 10 s after its cancel: {task.get_stack(limit=20)}"
            self.tasks[i] = None

    def running(self) -> list[int]:
        return [i for i, t in enumerate(self.tasks) if t is not None]

    def observe(self, shared: tuple[str, ...] = (), local: tuple[str, ...] = (), which: list[int] | None = None) -> None:
        now = asyncio.get_running_loop().time()
        for i in self.running() if which is None else which:
            self.guards[i].observe(shared, local, now)

    def views(self) -> list[GuardView]:
        return [self.guards[i].view() for i in self.running()]

    def describe(self) -> str:
        """Each running guard's state and last store error, for a failing wait."""
        return ", ".join(f"{i}: {v.state}{'' if v.store_ok else ' (' + v.store_error + ')'}"
                         for i, v in zip(self.running(), self.views(), strict=True))

    def count(self, state: str) -> int:
        return sum(1 for v in self.views() if v.state == state)

    async def group(self) -> Group:
        return await self.admin.members()

"""The read deadline moves with each response: a keep-alive client that keeps asking is never cut off."""

from __future__ import annotations

import asyncio
import inspect
import re

import aiohttp
from aiohttp import web

from tests.helpers import PASSING, async_wait_for

READ_TIMEOUT = 1.0
EVERY = 0.3  # seconds between the client's requests: well inside read_timeout
FOR = 3.0  # seconds the client keeps asking on its one connection: three read timeouts


def test_log_access_is_still_the_synchronous_hook_the_deadline_rides_on() -> None:
    """aiohttp's RequestHandler.log_access is a plain method called once per finished response."""
    assert not inspect.iscoroutinefunction(web.RequestHandler.log_access), (
        "aiohttp's RequestHandler.log_access is now a coroutine function: agent.serving.listener.Handler "
        "overrides it synchronously to move the read deadline when a response finishes. Move that to the "
        "hook this aiohttp offers (an awaited log_access, or a response-finished callback), then update this "
        "test")


async def test_a_keep_alive_client_active_beyond_read_timeout_is_not_cut_off(start_agent) -> None:
    """A client asking /status every 0.3 s on one connection for three read timeouts gets every answer on
    that same connection, and the agent drops no connection for its deadline."""
    agent = await start_agent({"checks": [PASSING], "server": {"read_timeout": f"{READ_TIMEOUT:g}s"}})
    opened = 0

    async def on_create(session: object, context: object, params: object) -> None:
        nonlocal opened
        opened += 1

    trace = aiohttp.TraceConfig()
    trace.on_connection_create_end.append(on_create)
    loop = asyncio.get_running_loop()
    codes = []
    # Every request of this test, the wait for up and the scrape included, on this client's one connection.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1), trace_configs=[trace]) as client:

        async def get(path: str) -> tuple[int, str]:
            async with client.get(agent.url + path, headers={"Accept": "application/json"}) as resp:
                return resp.status, await resp.text()

        async def up() -> bool:
            return (await get("/health"))[0] == 200

        await async_wait_for(up, timeout=5, what="up")
        end = loop.time() + FOR
        while loop.time() < end:
            codes.append((await get("/status"))[0])
            await asyncio.sleep(EVERY)  # the client's pace, the behaviour under test: not a wait for an effect
        _, metrics = await get("/metrics")
    assert len(codes) >= FOR / EVERY - 2 and set(codes) == {200}, codes
    assert opened == 1, f"{opened} connections for {len(codes)} requests: the agent closed a busy keep-alive one"
    assert re.search(r'^healthgate_http_dropped_connections_total\{reason="deadline"\} 0\.0$', metrics, re.M), metrics

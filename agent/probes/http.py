"""http: a request to a URL answers with an expected status (and body) in time."""

from __future__ import annotations

import asyncio
from typing import Literal

import aiohttp
from pydantic import AnyHttpUrl, Field

from agent.model import Observation
from agent.probes.base import CheckBase, CheckFailed, Context


class Config(CheckBase):
    type: Literal["http"]
    url: AnyHttpUrl
    method: Literal["GET", "HEAD", "POST", "OPTIONS"] = "GET"
    headers: dict[str, str] = Field(default_factory=dict)
    expect_status: list[int] = Field(default_factory=lambda: [200], min_length=1)
    body_contains: str | None = None

    def threshold(self) -> str:
        return "status in " + ",".join(map(str, self.expect_status))


async def probe(cfg: Config, ctx: Context) -> Observation:
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    try:
        async with ctx.http().request(
            cfg.method, str(cfg.url), headers=cfg.headers, allow_redirects=False
        ) as resp:
            body = await resp.text(errors="replace") if cfg.body_contains is not None else ""
            status = resp.status
    except aiohttp.ClientConnectorError as e:
        raise CheckFailed(f"http: {e.os_error.strerror or e}", "refused") from None
    except aiohttp.ClientError as e:
        raise CheckFailed(f"http: {type(e).__name__}: {e}", "error") from None
    ms = (loop.time() - t0) * 1000
    if status not in cfg.expect_status:
        raise CheckFailed(f"http: {status} after {ms:.0f} ms", "status")
    if cfg.body_contains is not None and cfg.body_contains not in body:
        raise CheckFailed(f"http: body lacks {cfg.body_contains!r}", "body")
    return Observation(value=ms / 1000, unit="seconds", detail=f"{status} in {ms:.0f} ms")

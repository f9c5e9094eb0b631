"""tcp: a TCP connect (IPv4 or IPv6) to host:port succeeds."""

from __future__ import annotations

import asyncio
from typing import Literal

from pydantic import Field

from agent.model import Observation
from agent.probes.base import CheckBase, CheckFailed, Context


class Config(CheckBase):
    type: Literal["tcp"]
    host: str = Field(default="127.0.0.1", min_length=1)
    port: int = Field(ge=1, le=65535)

    def threshold(self) -> str:
        return f"connect {self.host}:{self.port}"


async def probe(cfg: Config, ctx: Context) -> Observation:
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    try:
        _, writer = await asyncio.open_connection(cfg.host, cfg.port)
    except ConnectionRefusedError:
        raise CheckFailed(f"tcp {cfg.host}:{cfg.port}: connection refused", "refused") from None
    except OSError as e:
        raise CheckFailed(f"tcp {cfg.host}:{cfg.port}: {e.strerror or e}", "unreachable") from None
    elapsed = loop.time() - t0
    writer.close()
    try:
        await writer.wait_closed()
    except OSError:
        pass
    return Observation(value=elapsed, unit="seconds", detail=f"connected in {elapsed * 1000:.1f} ms")

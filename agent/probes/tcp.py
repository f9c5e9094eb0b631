"""tcp: a connect to host:port (IPv4 or IPv6) or to a unix socket succeeds, optionally with a banner exchange."""

from __future__ import annotations

import asyncio
from typing import Annotated, Literal

from pydantic import Field, StringConstraints, model_validator

from agent.model import Observation
from agent.probes.base import CheckBase, CheckFailed, Context
from agent.probes.common import address

READ_LIMIT = 4096  # bytes read while looking for `expect`: a banner, never a whole stream
Raw = Annotated[str, StringConstraints(strip_whitespace=False)]  # "PING\r\n": line ends matter


class Config(CheckBase):
    type: Literal["tcp"]
    host: str = Field(default="127.0.0.1", min_length=1, description="name, IPv4 or IPv6 address")
    port: int | None = Field(default=None, ge=1, le=65535)
    path: str | None = Field(default=None, min_length=1, description="unix socket path, instead of host/port")
    send: Raw | None = Field(default=None, min_length=1, description="text sent after connecting")
    expect: Raw | None = Field(default=None, min_length=1, description="text the first bytes read must contain")

    @model_validator(mode="after")
    def _one_target(self) -> Config:
        if self.path is None and self.port is None:
            raise ValueError("needs port (with host) or path (a unix socket)")
        if self.path is not None and (self.port is not None or "host" in self.model_fields_set):
            raise ValueError("path: set either host/port or path (a unix socket), not both")
        if self.send is not None and self.expect is None:
            raise ValueError("send: needs expect, the text the answer must contain")
        return self

    @property
    def target(self) -> str:
        return self.path if self.path is not None else address(self.host, self.port or 0)

    def threshold(self) -> str:
        return f"connect {self.target}" + (f", answer contains {self.expect!r}" if self.expect else "")


async def _connect(cfg: Config) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    if cfg.path is not None:
        return await asyncio.open_unix_connection(cfg.path, limit=READ_LIMIT)
    return await asyncio.open_connection(cfg.host, cfg.port, limit=READ_LIMIT)


async def _read_until(reader: asyncio.StreamReader, expect: bytes) -> bytes:
    seen = b""
    while expect not in seen and len(seen) < READ_LIMIT:
        chunk = await reader.read(READ_LIMIT - len(seen))
        if not chunk:
            break
        seen += chunk
    return seen


async def probe(cfg: Config, ctx: Context) -> Observation:
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    try:
        reader, writer = await _connect(cfg)
    except ConnectionRefusedError:
        raise CheckFailed(f"tcp {cfg.target}: connection refused", "refused") from None
    except FileNotFoundError:
        raise CheckFailed(f"tcp {cfg.target}: no such socket", "refused") from None
    except OSError as e:
        kind = "dns" if e.errno is None or e.errno < 0 else "unreachable"  # gaierror codes are negative
        raise CheckFailed(f"tcp {cfg.target}: {e.strerror or e}", kind) from None
    try:
        connected = loop.time() - t0
        if cfg.expect is None:
            return Observation(value=connected, unit="seconds", detail=f"connected in {connected * 1000:.1f} ms")
        if cfg.send is not None:
            writer.write(cfg.send.encode())
            await writer.drain()
        seen = await _read_until(reader, cfg.expect.encode())
        elapsed = loop.time() - t0
        obs = Observation(value=elapsed, unit="seconds", detail=f"answered in {elapsed * 1000:.1f} ms")
        if cfg.expect.encode() not in seen:
            got = seen[:60].decode(errors="replace")
            why = f"answer lacks {cfg.expect!r} (got {got!r})" if seen else "closed without answering"
            raise CheckFailed(f"tcp {cfg.target}: {why}", "answer", observation=obs)
        return obs
    except ConnectionResetError:
        raise CheckFailed(f"tcp {cfg.target}: connection reset", "reset") from None
    finally:
        writer.close()  # no wait_closed: a peer that never reads must not hold this sample open


"""redis: a fresh connection authenticates and answers PING; optionally the server has the expected role.

A passing sample's connection stays open, idle, until the next sample (agent/probes/keep.py): the server
dropping it makes the check sample again at once."""

from __future__ import annotations

import asyncio
import functools
import inspect
import ssl
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from agent.model import Observation
from agent.probes.base import CheckBase, CheckFailed, Context
from agent.probes.common import TLS_KEYS, TLSOptions, address, secret_forms, unique

if TYPE_CHECKING:
    import redis.asyncio
    import redis.asyncio.connection
    import redis.exceptions

ROLES = {"master": "master", "replica": "slave"}  # our word -> INFO replication's


@functools.cache
def no_setinfo() -> dict[str, Any]:
    """No CLIENT SETINFO on connect (a round trip per sample for nothing); redis-py 8 renamed the switch."""
    import redis.asyncio

    params = inspect.signature(redis.asyncio.Redis.__init__).parameters
    return {"driver_info": None} if "driver_info" in params else {"lib_name": None, "lib_version": None}


class Config(TLSOptions, CheckBase):
    type: Literal["redis"]
    host: str = Field(default="127.0.0.1", min_length=1)
    port: int = Field(default=6379, ge=1, le=65535)
    path: str | None = Field(default=None, min_length=1, description="unix socket, instead of host/port")
    db: int = Field(default=0, ge=0, le=1_000_000)
    username: str | None = Field(default=None, min_length=1, description="ACL user (Redis 6+)")
    password: str | None = Field(default=None, min_length=1, repr=False)
    tls: bool = False
    role: Literal["master", "replica"] | None = Field(
        default=None, description="fail unless INFO replication reports this role (a replica's link must be up)"
    )

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        if self.path is not None and ({"host", "port"} & self.model_fields_set or self.tls):
            raise ValueError("path: set either host/port (optionally with tls) or path (a unix socket), not both")
        tls_keys = [k for k in TLS_KEYS if k in self.model_fields_set]
        if tls_keys and not self.tls:
            raise ValueError(f"{tls_keys[0]}: needs tls = true")
        if self.username and not self.password:
            raise ValueError("username: needs password")
        return self

    @property
    def target(self) -> str:
        return self.path if self.path is not None else address(self.host, self.port)

    def model_post_init(self, _context: object) -> None:
        no_setinfo()  # loads redis-py now, with the config that needs it: not on the loop at the first sample

    def threshold(self) -> str:
        out = "PING answered, not loading"
        return out + (f", role {self.role}" if self.role else "")

    def secrets(self) -> tuple[str, ...]:
        return unique(secret_forms(self.password))


def _client(cfg: Config) -> redis.asyncio.Redis:
    import redis.asyncio
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    kw: dict[str, Any] = {}
    if cfg.path is not None:
        kw["unix_socket_path"] = cfg.path
    else:
        kw.update(host=cfg.host, port=cfg.port)
    if cfg.tls:
        kw.update(ssl=True, ssl_cert_reqs="required" if cfg.tls_verify else "none", ssl_check_hostname=cfg.tls_verify,
                  ssl_ca_certs=cfg.ca_file, ssl_certfile=cfg.cert_file, ssl_keyfile=cfg.key_file)
    # One connection per sample, no retries, no client-side timeouts: one sample is one honest attempt,
    # the runner owns the timeout, and hysteresis (fall/rise) absorbs a single blip.
    return redis.asyncio.Redis(
        **kw, db=cfg.db, username=cfg.username, password=cfg.password, single_connection_client=True,
        retry=Retry(NoBackoff(), 0), socket_timeout=None, socket_connect_timeout=None, socket_keepalive=False,
        decode_responses=True, protocol=2, **no_setinfo(),
    )


def _failure(cfg: Config, e: redis.exceptions.RedisError) -> CheckFailed:
    import redis.exceptions

    text = str(e).strip().rstrip(".")
    if isinstance(e, redis.exceptions.AuthenticationError | redis.exceptions.AuthorizationError):
        return CheckFailed(f"redis {cfg.target}: authentication failed: {text}", "auth")
    if isinstance(e, redis.exceptions.BusyLoadingError):
        return CheckFailed(f"redis {cfg.target}: loading the dataset into memory", "loading")
    if isinstance(e, redis.exceptions.ConnectionError):
        cause = e.__cause__ or e.__context__
        if isinstance(cause, ssl.SSLCertVerificationError):
            return CheckFailed(f"redis {cfg.target}: TLS certificate not accepted: {cause.verify_message}", "tls")
        if isinstance(cause, ssl.SSLError):
            return CheckFailed(f"redis {cfg.target}: TLS handshake failed: {cause.reason or cause}", "tls")
        if isinstance(cause, ConnectionRefusedError) or "refused" in text.lower():
            return CheckFailed(f"redis {cfg.target}: connection refused", "refused")
        if isinstance(cause, FileNotFoundError):
            return CheckFailed(f"redis {cfg.target}: no such socket", "refused")
        return CheckFailed(f"redis {cfg.target}: {text}", "connection")
    if isinstance(e, redis.exceptions.ResponseError) and text.startswith(("NOAUTH", "WRONGPASS", "NOPERM")):
        return CheckFailed(f"redis {cfg.target}: authentication failed: {text}", "auth")
    return CheckFailed(f"redis {cfg.target}: {type(e).__name__}: {text}", "error")


def _hold(conn: redis.asyncio.connection.AbstractConnection) -> tuple[Callable[[], Awaitable[bytes]],
                                                                      Callable[[], None]] | None:
    """What completes when the server drops the connection (a read on its stream: nothing is sent on a
    held connection, so nothing comes back but the end) and what closes its socket at once (the
    transport's abort); None if this redis-py keeps either elsewhere, and then nothing is held.
    tests/test_keep.py holds both to the installed redis-py."""
    reader = getattr(conn, "_reader", None)
    abort = getattr(getattr(getattr(conn, "_writer", None), "transport", None), "abort", None)
    if not isinstance(reader, asyncio.StreamReader) or not callable(abort):
        return None  # (uvloop's transports are no subclass of asyncio's: asked for the method alone)
    return (lambda: reader.read(1)), abort


async def probe(cfg: Config, ctx: Context) -> Observation:
    import redis.exceptions

    loop = asyncio.get_running_loop()
    token = await ctx.keeper.release(cfg.name)
    client = _client(cfg)
    held = False
    t0 = loop.time()
    try:
        # The sample's one connection, taken here so that a passing sample can hold it (below).
        conn = await client.connection_pool.get_connection()
        # One round trip for all three: PING proves it answers, INFO tells loading and role.
        pipe = client.pipeline(transaction=False)
        pipe.connection = conn
        pipe.ping()  # queued one by one: redis-py types a command's reply, not the pipeline it returns
        pipe.info("persistence")
        if cfg.role:
            pipe.info("replication")
        replies = await pipe.execute()
        obs = _judge(cfg, replies, loop.time() - t0)
        # Passed: the connection stays open until the next sample, so a server that dies is seen at once.
        hold = _hold(conn)
        held = hold is not None and ctx.keeper.keep(cfg.name, token, *hold, client.aclose)
        return obs
    except redis.exceptions.RedisError as e:
        raise _failure(cfg, e) from None
    finally:
        if not held:
            await client.aclose()


def _judge(cfg: Config, replies: list[Any], elapsed: float) -> Observation:
    """The observation of a sample that got its replies, or CheckFailed: loading, the wrong role, a replica
    without its master."""
    persistence = replies[1]
    role_info = replies[2] if cfg.role else {}
    role = "replica" if role_info.get("role") == ROLES["replica"] else role_info.get("role", "")
    detail = f"PONG in {elapsed * 1000:.1f} ms" + (f", role {role}" if role else "")
    obs = Observation(value=elapsed, unit="seconds", detail=detail)
    if str(persistence.get("loading", 0)) == "1":
        raise CheckFailed(f"redis {cfg.target}: loading the dataset into memory", "loading", observation=obs)
    if cfg.role and role != cfg.role:
        raise CheckFailed(f"redis {cfg.target}: role is {role or 'unknown'}, expected {cfg.role}", "role",
                          observation=obs)
    if cfg.role == "replica" and role_info.get("master_link_status") != "up":
        raise CheckFailed(f"redis {cfg.target}: replica's link to its master "
                          f"{role_info.get('master_host', '?')}:{role_info.get('master_port', '?')} is "
                          f"{role_info.get('master_link_status', 'unknown')}", "replication", observation=obs)
    return obs

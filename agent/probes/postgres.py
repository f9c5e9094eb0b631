"""postgres: a fresh connection authenticates and runs a query; optionally the server has the expected role."""

from __future__ import annotations

import asyncio
import functools
import ssl
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from agent.fields import DAY, Duration, format_duration
from agent.model import Observation
from agent.probes.base import CheckBase, CheckFailed, Context
from agent.probes.common import TLSOptions, address, client_context, secret_forms, unique, url_secrets

if TYPE_CHECKING:
    import asyncpg

# On a standby, lag is the age of the last replayed transaction while received WAL waits to be
# replayed; a standby that has replayed all it received has no lag (an idle primary writes nothing).
ROLE_SQL = """
SELECT pg_is_in_recovery(),
       pg_last_wal_receive_lsn() IS NOT DISTINCT FROM pg_last_wal_replay_lsn(),
       EXTRACT(EPOCH FROM clock_timestamp() - pg_last_xact_replay_timestamp())::float8
"""
DISCRETE = {"host", "port", "user", "password", "database"}


class Config(CheckBase):
    type: Literal["postgres"]
    dsn: str | None = Field(default=None, repr=False, json_schema_extra={"pattern": "^postgres(?:ql)?://"},
                            description="postgresql://user:password@host:port/database?sslmode=...")
    host: str = Field(default="127.0.0.1", min_length=1, description="name, address, or a unix socket directory")
    port: int = Field(default=5432, ge=1, le=65535)
    user: str = Field(default="postgres", min_length=1)
    password: str | None = Field(default=None, min_length=1, repr=False)
    database: str | None = Field(default=None, min_length=1, description="default: the user name")
    sslmode: Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"] | None = Field(
        default=None, description="as libpq; default: the DSN's, else prefer")
    ca_file: str | None = Field(default=None, min_length=1)
    cert_file: str | None = Field(default=None, min_length=1)
    key_file: str | None = Field(default=None, min_length=1)
    query: str = Field(default="SELECT 1", min_length=1, description="must succeed; a first value false fails")
    role: Literal["primary", "standby"] | None = None
    max_replication_lag: Annotated[float, Duration(DAY, positive=True)] | None = Field(
        default=None, description="a standby replaying further behind fails")

    @field_validator("dsn")
    @classmethod
    def _dsn(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("postgresql://", "postgres://")):
            raise ValueError("must be a URL: postgresql://user:password@host:port/database")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        if self.dsn is not None and DISCRETE & self.model_fields_set:
            raise ValueError("dsn: set either dsn or host/port/user/password/database, not both")
        verify = self.sslmode in ("verify-ca", "verify-full")
        if self.ca_file and not verify:
            raise ValueError("ca_file: needs sslmode = verify-ca or verify-full")
        if self.cert_file and self.sslmode not in ("require", "verify-ca", "verify-full"):
            raise ValueError("cert_file: needs sslmode = require, verify-ca or verify-full")
        if self.key_file and not self.cert_file:
            raise ValueError("key_file: needs cert_file")
        if self.max_replication_lag is not None and self.role == "primary":
            raise ValueError("max_replication_lag: applies to a standby; set role = standby or leave role unset")
        return self

    @property
    def target(self) -> str:
        if self.dsn is not None:
            return "(dsn)"
        return self.host if self.host.startswith("/") else address(self.host, self.port)

    def model_post_init(self, _context: object) -> None:
        server_errors()  # loads asyncpg now, with the config that needs it: not on the loop at the first sample

    def threshold(self) -> str:
        out = f"{self.query!r} succeeds"
        if self.role:
            out += f", role {self.role}"
        if self.max_replication_lag is not None:
            out += f", replication lag <= {format_duration(self.max_replication_lag)}"
        return out

    def secrets(self) -> tuple[str, ...]:
        return unique([*secret_forms(self.password), *(url_secrets(self.dsn) if self.dsn else [])])


async def _ssl(cfg: Config, ctx: Context) -> Any:
    mode = cfg.sslmode
    if mode is None:
        return None  # the DSN's sslmode, else asyncpg's default (prefer)
    if mode == "disable":
        return False
    if mode in ("verify-ca", "verify-full") or cfg.cert_file:
        opts = TLSOptions(tls_verify=mode != "require", ca_file=cfg.ca_file, cert_file=cfg.cert_file,
                          key_file=cfg.key_file)
        return await client_context(opts, cfg.name, ctx, check_hostname=mode == "verify-full")
    return mode


async def _connect(cfg: Config, ctx: Context) -> asyncpg.Connection:
    kw: dict[str, Any] = {"ssl": await _ssl(cfg, ctx)} if cfg.sslmode else {}
    if cfg.dsn is None:
        kw.update(host=cfg.host, port=cfg.port, user=cfg.user, password=cfg.password,
                  database=cfg.database or cfg.user)
    # The server ends a query of ours that outlives the sample: an abandoned sample leaves no backend
    # behind running it. Timing the sample is still the runner's job.
    settings = {"application_name": "healthgate", "statement_timeout": str(max(1, int(cfg.timeout * 1000)))}
    import asyncpg

    return await asyncpg.connect(cfg.dsn, **kw, statement_cache_size=0, server_settings=settings)


@functools.cache
def server_errors() -> tuple[tuple[type[BaseException], str, str], ...]:
    """Server errors worth their own words and metric kind; the first matching class wins."""
    import asyncpg

    return (
        (asyncpg.InvalidPasswordError, "authentication failed", "auth"),
        (asyncpg.InvalidAuthorizationSpecificationError, "authentication failed", "auth"),
        (asyncpg.TooManyConnectionsError, "no connection slot left", "capacity"),
        (asyncpg.CannotConnectNowError, "not accepting connections", "unavailable"),
        (asyncpg.QueryCanceledError, "query cancelled", "timeout"),
    )


def _failure(cfg: Config, e: BaseException) -> CheckFailed:
    import asyncpg

    where = f"postgres {cfg.target}"
    for cls, words, kind in server_errors():
        if isinstance(e, cls):
            return CheckFailed(f"{where}: {words}: {e}", kind)
    if isinstance(e, asyncpg.PostgresError):
        return CheckFailed(f"{where}: {type(e).__name__}: {e}", "query")
    if isinstance(e, ssl.SSLCertVerificationError):
        return CheckFailed(f"{where}: TLS certificate not accepted: {e.verify_message}", "tls")
    if isinstance(e, ssl.SSLError) or "SSL" in str(e):  # asyncpg: "rejected SSL upgrade" when TLS is off
        return CheckFailed(f"{where}: TLS handshake failed: {getattr(e, 'reason', None) or e}", "tls")
    if isinstance(e, ConnectionRefusedError):
        return CheckFailed(f"{where}: connection refused", "refused")
    if isinstance(e, FileNotFoundError):
        return CheckFailed(f"{where}: no server socket in {cfg.host}", "refused")
    if isinstance(e, OSError):
        return CheckFailed(f"{where}: {e.strerror or e}", "unreachable")
    return CheckFailed(f"{where}: {type(e).__name__}: {e}", "error")


async def probe(cfg: Config, ctx: Context) -> Observation:
    import asyncpg

    loop = asyncio.get_running_loop()
    t0 = loop.time()
    conn = None
    try:
        conn = await _connect(cfg, ctx)
        row = await conn.fetchrow(cfg.query)
        elapsed = loop.time() - t0
        server = await conn.fetchrow(ROLE_SQL)
        assert server is not None  # a SELECT without FROM returns one row
        standby, caught_up, age = server
        await conn.close()  # a polite Terminate on the happy path; the finally below covers the rest
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, ConnectionError) as e:
        raise _failure(cfg, e) from None
    finally:
        if conn is not None and not conn.is_closed():
            conn.terminate()
    role = "standby" if standby else "primary"
    lag = None if not standby else 0.0 if caught_up else age  # None on a standby: behind by an unknown time
    values = (("replication_lag", float(lag), "seconds"),) if lag is not None else ()
    detail = role
    if standby:
        detail += f", replication lag {lag:.2f} s" if lag is not None else ", replication lag unknown"
    obs = Observation(value=elapsed, unit="seconds", detail=f"{detail}, query in {elapsed * 1000:.1f} ms",
                      values=values)
    if row is not None and len(row) and row[0] is False:
        raise CheckFailed(f"postgres {cfg.target}: query returned false", "query", observation=obs)
    if cfg.role and role != cfg.role:
        raise CheckFailed(f"postgres {cfg.target}: server is a {role}, expected a {cfg.role}", "role",
                          observation=obs)
    if cfg.max_replication_lag is not None and standby and lag is None:
        raise CheckFailed(f"postgres {cfg.target}: replication lag unknown: WAL received but no transaction "
                          "replayed yet", "lag", observation=obs)
    if cfg.max_replication_lag is not None and lag is not None and lag > cfg.max_replication_lag:
        raise CheckFailed(f"postgres {cfg.target}: replication lag {lag:.2f} s > "
                          f"{format_duration(cfg.max_replication_lag)}", "lag", observation=obs)
    return obs

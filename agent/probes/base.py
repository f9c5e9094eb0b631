"""What every probe shares: the common check keys, the failure exception and the context."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import Field, ValidationInfo, field_validator

from agent import __version__
from agent.fields import DAY, HOUR, Duration, Strict, format_duration
from agent.fleet.scope import Scope, default_scope
from agent.probes.keep import Keeper

if TYPE_CHECKING:
    import aiohttp

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"
FAST_FLOOR = 0.05  # seconds: the default re-check after a first failure is never sooner than this


def default_fast_interval(interval: float) -> float:
    """HAProxy's fastinter idea, on by default: a first failure is re-checked after interval/5 (at least
    FAST_FLOOR, at most interval), so `fall` failures confirm an outage in about a fifth of the time.

    It costs a failing dependency fall - 1 extra samples per outage (the re-checks before it is down);
    a passing check, and one already down, sample at `interval` as before.
    """
    return min(interval, max(interval / 5, FAST_FLOOR))


class CheckBase(Strict):
    """Keys every check has; each probe module subclasses it with `type` and its own keys."""

    name: str = Field(pattern=NAME_PATTERN, description="unique; letters, digits, _ . -")
    interval: Annotated[float, Duration(DAY, positive=True)] = Field(default=2.0,
                                                                     description="time between samples")
    timeout: Annotated[float, Duration(HOUR, positive=True)] = Field(
        default=1.0, description="a sample taking longer fails with `timeout`")
    fall: int = Field(default=2, ge=1, le=100, description="consecutive failures before the check is down")
    rise: int = Field(default=2, ge=1, le=100, description="consecutive passes before it is up again")
    critical: bool = Field(default=True, description="a non-critical check is reported but never moves the verdict")
    jitter: float = Field(default=0.1, ge=0, le=0.5, description="random spread of the interval, as a fraction")
    fast_interval: Annotated[float, Duration(DAY, positive=True)] | None = Field(
        default=None, description="after a failure, re-check this soon until `fall` confirms it (HAProxy's "
                                  "fastinter); unset = interval/5, at least 50ms"
    )
    scope: Scope | None = Field(
        default=None, description="fleet guard: shared (every node sees this fault: held up while the group can't "
        "spare the node) or local (down at once); default by type: shared for tcp, http, tls, dns, redis, postgres, "
        "cpu, load, pressure, listen_queue; local for the rest"
    )

    @field_validator("timeout")
    @classmethod
    def _timeout_below_interval(cls, v: float, info: ValidationInfo) -> float:
        interval = info.data.get("interval")
        if interval is not None and v >= interval:
            raise ValueError(f"must be shorter than interval ({format_duration(interval)})")
        return v

    @property
    def fleet_scope(self) -> Scope:
        """The scope in force: the configured one, else the type's default."""
        return self.scope or default_scope(getattr(self, "type", ""))

    def confirm_interval(self) -> float:
        """The delay before the next sample while a failure is not yet confirmed (fewer than `fall`)."""
        return self.fast_interval or default_fast_interval(self.interval)

    def threshold(self) -> str:
        """The pass condition in words, for /status and the status page."""
        return ""

    def secrets(self) -> tuple[str, ...]:
        """Strings that must never leave the agent (passwords, tokens)."""
        return ()

    def preflight(self, proc: Path = Path("/proc")) -> tuple[str, ...]:
        """Problems this host shows with the check (no PSI, a missing command): warnings, not config errors,
        since a config is often validated on another machine than the one that runs it."""
        return ()


def headroom(value: float, limit: float, best: float) -> float | None:
    """How far `value` is from failing at `limit`, as a fraction of the way from `best` to `limit`.

    1 at `best` (the ideal reading), 0 at the threshold, negative past it. One formula serves both
    directions: an upper bound (memory used <= 95%: best 0) and a lower bound (disk free >= 5%: best 100),
    so headrooms of different checks compare. A probe with a numeric threshold puts this in
    `Observation.headroom`; None when the bound is degenerate (limit == best).
    """
    if limit == best:
        return None
    return round((limit - value) / (limit - best), 4)


class CheckFailed(Exception):
    """Raised by a probe: the check failed for a reason a human can act on.

    `kind` is a short, bounded label for metrics (`refused`, `status`, `threshold`...).
    """

    def __init__(self, reason: str, kind: str = "failed", observation: Any = None):
        super().__init__(reason)
        self.reason = reason
        self.kind = kind
        self.observation = observation


@dataclass
class Context:
    """Shared resources handed to every probe; the runner and the scheduler own their lifetime."""

    proc: Path = Path("/proc")  # injectable so fixture files can drive the system probes
    memo: dict[tuple[object, ...], Any] = field(default_factory=dict)  # per-check memory between samples
    keeper: Keeper = field(default_factory=Keeper)  # connections passing samples leave open (probes/keep.py)
    _http: aiohttp.ClientSession | None = None

    def http(self) -> aiohttp.ClientSession:
        """One shared client session with bounded connections, created on first use (so a config without
        http checks never imports aiohttp's client)."""
        if self._http is None or self._http.closed:
            import aiohttp

            connector = aiohttp.TCPConnector(limit=64, limit_per_host=8, force_close=True)
            # No cookie jar: a check is stateless, and one check's cookies must never reach another's server.
            self._http = aiohttp.ClientSession(connector=connector, trust_env=False,
                                               cookie_jar=aiohttp.DummyCookieJar(),
                                               headers={"User-Agent": f"healthgate/{__version__}"})
        return self._http

    async def close(self) -> None:
        await self.keeper.close()
        if self._http is not None:
            await self._http.close()
            self._http = None

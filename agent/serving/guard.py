"""The limits every HTTP connection lives under: the connection cap, the read deadline, allow_from and
max_request_rate, shared by the fast responder and aiohttp's handlers of one listener."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Iterator
from operator import attrgetter
from typing import Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from agent.access import admitted
from agent.config import ServerConfig

BUCKETS = 4096  # client addresses whose request rate is remembered (the least recent are forgotten first)
PROBE_COST = 0.1  # of a token: what a probe answered by aiohttp costs against max_request_rate


class Connection(Protocol):
    """What the guard needs of a connection it counts: the fast responder's and aiohttp's protocols alike."""

    _due: float  # loop time by which its next complete request must arrive

    @property
    def transport(self) -> asyncio.Transport | None: ...


class Guard:
    """The open connections and the limits they live under; shared by every connection of one listener.

    Invariant: `open` holds at most `limit` connections. At the cap a new connection evicts the one
    that has gone longest without completing a request (idle keep-alives and slow or stuck clients
    first), so thousands of idle connections can never lock a load balancer's probe out.
    """

    def __init__(self, server: ServerConfig):
        self.open: dict[Connection, None] = {}
        self.dropped: collections.Counter = collections.Counter()  # reason -> connections closed by us
        self.bad: collections.Counter = collections.Counter()  # status -> malformed requests answered
        self._buckets: collections.OrderedDict[str, tuple[float, float]] = collections.OrderedDict()  # see within_rate
        self.configure(server)

    def configure(self, server: ServerConfig, rate: float | None = None) -> None:
        """Limits from [server]; a reload applies them to connections accepted from then on. `rate`
        overrides server.max_request_rate (the admin socket's guard: 0, operators are not rate-limited)."""
        self.limit = server.max_connections
        self.read_timeout = server.read_timeout
        self.allow_from = server.allow_from
        self.rate = server.max_request_rate if rate is None else rate
        self.fast_health = server.fast_health

    def within_rate(self, transport: asyncio.BaseTransport | None, now: float, probe: bool,
                    take: bool = True) -> bool:
        """Whether one more request may go to aiohttp from this client's address: a token bucket per address
        (`rate` a second, a second's worth of burst; the BUCKETS most recent addresses are kept). A probe
        (a /health, /ready or /live the fast responder could not take, for an unusual header, say) costs a
        tenth: a load balancer's checks are never refused at rates it sends, and a flood of anything costs
        the loop a bounded share. `take=False` looks without taking (the fast responder, before aiohttp's
        own look at the same request). The exact probes the fast responder answers never ask."""
        if not self.rate or transport is None or (probe and not self.fast_health):
            return True  # with fast_health = false aiohttp answers every probe: they are never limited
        peer = transport.get_extra_info("peername")
        key = peer[0] if isinstance(peer, tuple) and peer else ""
        cost = PROBE_COST if probe else 1.0
        tokens, last = self._buckets.pop(key, (self.rate, now))
        tokens = min(self.rate, tokens + (now - last) * self.rate)
        ok = tokens >= cost
        self._buckets[key] = (tokens - cost if ok and take else tokens, now)
        if len(self._buckets) > BUCKETS:
            self._buckets.popitem(last=False)
        if not ok:
            self.dropped["rate"] += 1
        return ok

    def refuse(self, transport: asyncio.BaseTransport) -> bool:
        """Close a connection from outside `allow_from` without a reply (and before it can evict anyone)."""
        if admitted(transport, self.allow_from):
            return False
        self.dropped["refused"] += 1
        transport.abort()  # type: ignore[attr-defined]
        return True

    def admit(self, handler: Connection) -> None:
        while len(self.open) >= self.limit:
            victim = min(self.open, key=attrgetter("_due"))
            self.drop(victim, "capacity")
        self.open[handler] = None

    def drop(self, handler: Connection, reason: str) -> None:
        self.open.pop(handler, None)
        self.dropped[reason] += 1
        if handler.transport is not None:
            handler.transport.abort()  # not close(): that waits for a client that may never read

    # -- metrics, read at scrape time ------------------------------------------------------------

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("healthgate_http_connections", "open HTTP connections", value=len(self.open))
        dropped = CounterMetricFamily("healthgate_http_dropped_connections",
                                      "connections closed by the agent: capacity (evicted at max_connections), "
                                      "deadline (no complete request within read_timeout), refused (a client "
                                      "outside allow_from) or rate (429 past max_request_rate)", labels=["reason"])
        for reason in ("capacity", "deadline", "refused", "rate"):
            dropped.add_metric([reason], float(self.dropped[reason]))
        yield dropped
        bad = CounterMetricFamily("healthgate_http_bad_requests", "malformed requests refused, by status",
                                  labels=["code"])
        for code, n in sorted(self.bad.items()):
            bad.add_metric([str(code)], float(n))
        yield bad

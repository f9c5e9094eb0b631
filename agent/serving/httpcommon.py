"""What the aiohttp handlers and the status page share: the app's keys, the rule for who may see details,
and the formatting of times and JSON."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import time
from typing import Any

from aiohttp import web

from agent import logs
from agent.access import trusted
from agent.state import AgentState

STATE = web.AppKey("state", AgentState)
REGISTRY = web.AppKey("registry", object)
TOKENS = web.AppKey("tokens", dict)

NO_STORE = {"Cache-Control": "no-store"}
HEALTH_JSON = "application/health+json"


def iso(wall: float | None) -> str | None:
    if wall is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(wall)) + f".{int(wall % 1 * 1000):03d}Z"


def now() -> float:
    return asyncio.get_running_loop().time()


def authorized(request: web.Request, token: str | None) -> bool:
    """May see details: a client of the admin socket or of a trusted network, or one presenting the
    status token (compared in constant time)."""
    networks = request.app[STATE].config.server.trusted_networks
    return trusted(request.transport, networks) or bearer(request, token) is True


def bearer(request: web.Request, token: str | None) -> bool | None:
    """True for the right bearer token (compared in constant time), False for a wrong one, None for none
    or for credentials that cannot be a bearer token (another scheme, bytes that are not UTF-8)."""
    got = request.headers.get("Authorization")
    if not token or got is None:
        return None
    if got[:7].lower() != "bearer ":  # the scheme is case-insensitive (RFC 9110)
        _refused_credentials(request, "not a bearer token")
        return None
    try:
        presented = got[7:].strip().encode()
    except UnicodeEncodeError:  # aiohttp keeps bytes that are not UTF-8 as lone surrogates
        _refused_credentials(request, "not UTF-8")
        return None
    ok = hmac.compare_digest(presented, token.encode())
    if not ok:
        _refused_credentials(request, "wrong token")
    return ok


class Throttled:
    """One log line per `every` seconds at most; the events in between are counted in the next line.

    Any client can send bad credentials, so a line per request would let it flood the journal. One
    instance per app (make_app), touched only from the event loop.
    """

    def __init__(self, event: str, every: float):
        self.event, self.every = event, every
        self.last = -math.inf
        self.count = 0

    def __call__(self, **fields: object) -> None:
        self.count += 1
        now = time.monotonic()
        if now - self.last < self.every:
            return
        logs.event(self.event, logging.WARNING, requests=self.count, **fields)
        self.last, self.count = now, 0


REFUSED = web.AppKey("refused_credentials", Throttled)


def _refused_credentials(request: web.Request, why: str) -> None:
    # Neither the header nor the path is logged: both are the client's text.
    throttled = request.app.get(REFUSED)
    if throttled is not None:
        throttled(why=why, client=request.remote)


def dumps(obj: Any) -> str:
    """JSON as every endpoint writes it: indented, one trailing newline."""
    return json.dumps(obj, indent=2) + "\n"

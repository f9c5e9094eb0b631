"""The HTTP endpoints: make_app(state) -> web.Application. Every handler reads the snapshot; none probes."""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import socket
import time
from typing import Any

from aiohttp import web

from agent import __version__
from agent.model import Admin, CheckView, Snapshot
from agent.state import AgentState
from agent.verdict import why

STATE = web.AppKey("state", AgentState)
REGISTRY = web.AppKey("registry", object)
TOKENS = web.AppKey("tokens", dict)

NO_STORE = {"Cache-Control": "no-store"}
HEALTH_JSON = "application/health+json"


def iso(wall: float | None) -> str | None:
    if wall is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(wall)) + f".{int(wall % 1 * 1000):03d}Z"


def current(state: AgentState) -> tuple[Snapshot, bool]:
    """The snapshot and whether it is fresh. A stale snapshot means the loop was stalled: fail closed."""
    snap = state.snapshot
    age = asyncio.get_running_loop().time() - snap.computed_at
    return snap, age <= state.config.policy.max_loop_lag


def health_status(state: AgentState, snap: Snapshot, fresh: bool) -> int:
    if not fresh:
        return 503
    if snap.admin is Admin.DRAIN and snap.verdict.up:
        return state.config.server.drain_status
    return 200 if snap.serving_up else 503


async def health(request: web.Request) -> web.Response:
    state = request.app[STATE]
    snap, fresh = current(state)
    code = health_status(state, snap, fresh)
    return web.Response(status=code, text="up\n" if code == 200 else "down\n", headers=NO_STORE)


async def live(request: web.Request) -> web.Response:
    state = request.app[STATE]
    snap, fresh = current(state)
    ok = fresh and snap.live
    return web.Response(status=200 if ok else 503, text="live\n" if ok else "stalled\n", headers=NO_STORE)


def _loopback(request: web.Request) -> bool:
    peer = request.transport.get_extra_info("peername") if request.transport else None
    if not peer:
        return False
    if isinstance(peer, str):  # unix socket
        return True
    try:
        return ipaddress.ip_address(peer[0].split("%")[0]).is_loopback
    except ValueError:
        return False


def authorized(request: web.Request, token: str | None) -> bool:
    """Loopback clients, or a bearer token compared in constant time."""
    if _loopback(request):
        return True
    if not token:
        return False
    got = request.headers.get("Authorization", "")
    return got.startswith("Bearer ") and hmac.compare_digest(got[7:].strip().encode(), token.encode())


def check_entry(v: CheckView) -> dict[str, Any]:
    s = v.state
    last = s.last
    obs = last.observation if last else None
    entry: dict[str, Any] = {
        "componentId": v.name,
        "componentType": v.type,
        "status": "pass" if v.passing else "fail",
        "critical": v.critical,
        "state": "stale" if v.stale else s.status.value,
        "threshold": v.threshold,
        "consecutiveSuccesses": s.consecutive_ok,
        "consecutiveFailures": s.consecutive_fail,
        "lastTransition": iso(s.changed_wall),
        "lastTransitionReason": s.change_reason,
        "history": "".join("+" if ok else "-" for ok in s.history),
        "rise": s.required_rise or v.rise,
        "fall": v.fall,
        "intervalSeconds": v.interval,
    }
    if last is not None:
        entry["time"] = iso(last.wall)
        entry["durationSeconds"] = round(last.duration, 6)
    if obs is not None:
        entry["observedValue"] = obs.value
        entry["observedUnit"] = obs.unit
        if obs.detail:
            entry["detail"] = obs.detail
        if obs.headroom is not None:
            entry["headroom"] = obs.headroom
    if not v.passing:
        entry["output"] = why(v)
    return entry


def served_state(snap: Snapshot, fresh: bool) -> str:
    """up, down, drain or maint: what the node is, for people. Failing checks outrank drain/maint."""
    if not fresh or not snap.verdict.up:
        return "down"
    return "up" if snap.admin is Admin.READY else snap.admin.value


def status_body(state: AgentState, snap: Snapshot, fresh: bool, detailed: bool) -> dict[str, Any]:
    up = fresh and snap.serving_up
    body: dict[str, Any] = {"status": "pass" if up else "fail"}
    if not detailed:
        return body
    reason = snap.verdict.reason if fresh else "agent stalled: no fresh verdict"
    if fresh and snap.verdict.up and snap.admin is not Admin.READY:
        reason = f"{snap.admin.value}: {snap.admin_reason}" if snap.admin_reason else snap.admin.value
    body.update({
        "version": "1",
        "releaseId": __version__,
        "serviceId": socket.gethostname(),
        "description": "healthgate node verdict",
        "output": reason,
        "healthgate": {
            "verdict": ("up" if up else "down"),
            "admin": snap.admin.value,
            "adminReason": snap.admin_reason,
            "adminUntil": iso(state.admin_until),
            "since": iso(snap.since_wall),
            "live": snap.live and fresh,
            "eventLoopLagSeconds": round(snap.loop_lag, 6),
            "failing": list(snap.verdict.failing),
            "state": served_state(snap, fresh),
            "time": iso(time.time()),
        },
        "checks": {f"{v.name}:{v.type}": [check_entry(v)] for v in snap.checks},
    })
    return body


async def status(request: web.Request) -> web.Response:
    from agent.statuspage import page, prefers_html

    if prefers_html(request.headers.get("Accept", "")):
        return await page(request)
    state = request.app[STATE]
    snap, fresh = current(state)
    detailed = authorized(request, request.app[TOKENS].get("status"))
    body = status_body(state, snap, fresh, detailed)
    return web.json_response(body, status=200 if body["status"] == "pass" else 503, content_type=HEALTH_JSON,
                             headers={**NO_STORE, "Vary": "Accept"}, dumps=_dumps)


def _dumps(obj: Any) -> str:
    import json

    return json.dumps(obj, indent=2) + "\n"


async def metrics(request: web.Request) -> web.Response:
    from agent.metrics import render

    body = render(request.app[REGISTRY])
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8",
                                            **NO_STORE})


@web.middleware
async def refuse_bodies(request: web.Request, handler):
    if request.body_exists:
        return web.Response(status=413, text="request bodies are not accepted\n")
    return await handler(request)


def make_app(state: AgentState, registry: object, tokens: dict[str, str | None] | None = None) -> web.Application:
    app = web.Application(middlewares=[refuse_bodies], client_max_size=0)
    app[STATE] = state
    app[REGISTRY] = registry
    app[TOKENS] = tokens or {}
    for path in ("/health", "/ready"):
        app.router.add_get(path, health)  # add_get also answers HEAD
    app.router.add_get("/live", live)
    app.router.add_get("/status", status)
    app.router.add_get("/metrics", metrics)
    from agent.statuspage import add_routes

    add_routes(app)
    return app

"""The HTTP endpoints: make_app(state) -> web.Application. Every handler reads the snapshot; none probes."""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import socket
import time
from dataclasses import replace
from typing import Any

from aiohttp import web

from agent import __version__
from agent.admin import AdminWatcher, AdminWriteError, make_record, parse_for, write_record
from agent.logs import mask
from agent.model import Admin, CheckView, Snapshot
from agent.state import AgentState
from agent.verdict import aggregate, why

STATE = web.AppKey("state", AgentState)
REGISTRY = web.AppKey("registry", object)
TOKENS = web.AppKey("tokens", dict)
ADMIN = web.AppKey("admin", AdminWatcher)

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
    if request.query_string:  # ?verbose, ?exclude=: off the hot path, still no probing
        return health_detail(request, state, snap, fresh)
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
    return _loopback(request) or bearer(request, token) is True


def bearer(request: web.Request, token: str | None) -> bool | None:
    """True for the right bearer token (compared in constant time), False for a wrong one, None for none."""
    got = request.headers.get("Authorization", "")
    if not token or got[:7].lower() != "bearer ":  # the scheme is case-insensitive (RFC 9110)
        return None
    return hmac.compare_digest(got[7:].strip().encode(), token.encode())


def excluding(snap: Snapshot, excluded: frozenset[str]) -> Snapshot:
    """The snapshot as if the excluded checks did not count: the verdict re-aggregated from the check views.

    aggregate() names failing checks only when the loop is healthy and the agent is not stopping, so a
    verdict without failing checks is down for the agent's own reasons, which no exclusion can lift.
    """
    if not excluded or snap.verdict.up or not snap.verdict.failing:
        return snap
    return replace(snap, verdict=aggregate(v for v in snap.checks if v.name not in excluded))


def verbose_lines(snap: Snapshot, fresh: bool, excluded: frozenset[str], reasons: bool) -> list[str]:
    """One line per check as kube-apiserver's /readyz?verbose, then the agent's own conditions."""

    def failed(text: str) -> str:
        return text if reasons else "reason withheld"

    lines = []
    for v in snap.checks:
        if v.name in excluded:
            lines.append(f"[+]{v.name} excluded: ok")
        elif v.passing:
            lines.append(f"[+]{v.name} ok")
        else:
            note = "" if v.critical else " (not critical)"
            lines.append(f"[-]{v.name} failed{note}: {failed(why(v))}")
    # Names with ':' cannot clash with a check's name, and cannot be excluded.
    if not fresh:
        lines.append(f"[-]agent:serving failed: {failed('agent stalled: no fresh verdict')}")
    elif not snap.verdict.up and not snap.verdict.failing:
        lines.append(f"[-]agent:serving failed: {failed(snap.verdict.reason)}")
    else:
        lines.append("[+]agent:serving ok")
    if snap.admin is Admin.READY:
        lines.append("[+]agent:admin ok")
    else:
        admin = f"{snap.admin.value}: {snap.admin_reason}" if snap.admin_reason else snap.admin.value
        lines.append(f"[-]agent:admin failed: {failed(admin)}")
    unknown = sorted(excluded - {v.name for v in snap.checks})
    if unknown:  # quoted: a name from the query string must not be able to forge a line
        names = ", ".join(json.dumps(n) for n in unknown)
        lines.append(f"warn: some health checks cannot be excluded: no matches for {names}")
    return lines


def health_detail(request: web.Request, state: AgentState, snap: Snapshot, fresh: bool) -> web.Response:
    excluded = frozenset(name for name in request.query.getall("exclude", ()) if name)
    code = health_status(state, excluding(snap, excluded), fresh)
    if "verbose" not in request.query:
        return web.Response(status=code, text="up\n" if code == 200 else "down\n", headers=NO_STORE)
    reasons = authorized(request, request.app[TOKENS].get("status"))
    lines = verbose_lines(snap, fresh, excluded, reasons)
    lines.append("healthz check passed" if code == 200 else "healthz check failed")
    return web.Response(status=code, text="\n".join(lines) + "\n", headers=NO_STORE)


async def one_check(request: web.Request) -> web.Response:
    """/health/<check>: one check's own state, whatever the others and the admin state say."""
    state = request.app[STATE]
    snap, fresh = current(state)
    name = request.match_info["check"]
    v = next((v for v in snap.checks if v.name == name), None)
    if v is None:
        return web.Response(status=404, text=f"unknown check: {json.dumps(name)}\n", headers=NO_STORE)
    if fresh and v.passing:
        return web.Response(text="up\n", headers=NO_STORE)
    text = "down\n"
    if authorized(request, request.app[TOKENS].get("status")):
        text = f"down: {why(v) if fresh else 'agent stalled: no fresh verdict'}\n"
    return web.Response(status=503, text=text, headers=NO_STORE)


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
    secrets = state.config.secrets()  # results are masked already; this also covers thresholds and journals
    return web.json_response(body, status=200 if body["status"] == "pass" else 503, content_type=HEALTH_JSON,
                             headers={**NO_STORE, "Vary": "Accept"}, dumps=lambda obj: mask(_dumps(obj), secrets))


def _dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2) + "\n"


async def metrics(request: web.Request) -> web.Response:
    from agent.metrics import render

    body = render(request.app[REGISTRY])
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8",
                                            **NO_STORE})


ADMIN_ACTIONS = {"drain": Admin.DRAIN, "maint": Admin.MAINT, "ready": Admin.READY}
ADMIN_WRITE_TIMEOUT = 5.0


async def admin_action(request: web.Request) -> web.Response:
    """POST /admin/{drain,maint,ready}?for=10m&reason=...: the CLI's drain/maint/ready over HTTP.

    Without an admin token configured these paths do not exist (404), for every method and client,
    loopback included: nothing changes state over HTTP unless an operator opted in.
    """
    token = request.app[TOKENS].get("admin")
    admin = ADMIN_ACTIONS.get(request.match_info["action"])
    if not token or admin is None:
        raise web.HTTPNotFound()
    if request.method != "POST":
        raise web.HTTPMethodNotAllowed(request.method, ["POST"])
    ok = bearer(request, token)
    if ok is None:
        return web.json_response({"error": "a bearer token is required"}, status=401, headers={
            "WWW-Authenticate": 'Bearer realm="healthgate"', **NO_STORE})
    if not ok:
        return web.json_response({"error": "wrong token"}, status=403, headers=NO_STORE)
    unknown = sorted(set(request.query) - {"for", "reason"})
    if unknown:
        return web.json_response({"error": f"unknown parameter(s): {', '.join(unknown)}"}, status=400)
    duration = None
    if "for" in request.query:
        try:
            duration = parse_for(request.query["for"])
        except ValueError as e:
            return web.json_response({"error": f"for: {e}"}, status=400)
        if admin is Admin.READY or duration <= 0:
            return web.json_response({"error": "for: must be a positive duration, with drain or maint"},
                                     status=400)
    reason = request.query.get("reason", "")
    state = request.app[STATE]
    record = make_record(admin, reason, duration, source="http")
    try:
        async with asyncio.timeout(ADMIN_WRITE_TIMEOUT):  # a hung state directory must not hang the request
            path = await asyncio.to_thread(write_record, state.config.agent.state_dir, record)
    except AdminWriteError as e:
        return web.json_response({"error": str(e)}, status=500, headers=NO_STORE)
    except TimeoutError:
        return web.json_response({"error": f"the state directory did not answer within {ADMIN_WRITE_TIMEOUT:g}s; "
                                           "the change may still apply"},
                                 status=503, headers=NO_STORE)
    await request.app[ADMIN].sync()
    return web.json_response({"admin": record.admin.value, "reason": record.reason,
                              "until": iso(record.until), "stateFile": str(path)}, headers=NO_STORE)


@web.middleware
async def refuse_bodies(request: web.Request, handler):
    if request.body_exists:
        return web.Response(status=413, text="request bodies are not accepted\n")
    return await handler(request)


def make_app(state: AgentState, registry: object, tokens: dict[str, str | None] | None = None,
             admin: AdminWatcher | None = None) -> web.Application:
    app = web.Application(middlewares=[refuse_bodies], client_max_size=0)
    app[STATE] = state
    app[ADMIN] = admin or AdminWatcher(state)
    app[REGISTRY] = registry
    app[TOKENS] = tokens or {}
    for path in ("/health", "/ready"):
        app.router.add_get(path, health)  # add_get also answers HEAD
        app.router.add_get(path + "/{check}", one_check)
    app.router.add_get("/live", live)
    app.router.add_get("/status", status)
    app.router.add_get("/metrics", metrics)
    from agent.statuspage import add_routes

    add_routes(app)
    app.router.add_route("*", "/admin/{action}", admin_action)
    return app

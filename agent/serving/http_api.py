"""The HTTP endpoints: make_app(state) -> web.Application. Every handler reads the snapshot; none probes."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from agent import __version__
from agent.access import is_unix
from agent.admin import AdminWriteError, make_record, parse_for, state_path
from agent.model import Admin, CheckView, Snapshot
from agent.serving.admin_watch import AdminWatcher
from agent.serving.decision import (
    Answer,
    admin_text,
    check_reason,
    check_state,
    check_up,
    decide,
    excluding,
    health_response,
    live_response,
)
from agent.serving.httpcommon import (
    HEALTH_JSON,
    NO_STORE,
    REFUSED,
    REGISTRY,
    STATE,
    TOKENS,
    Throttled,
    authorized,
    bearer,
    dumps,
    iso,
    now,
)
from agent.serving.statuspage import add_routes, page, prefers_html
from agent.state import AgentState
from agent.text import mask_all, one_line, tidy

if TYPE_CHECKING:
    from agent.fleet.guard import GuardView

ADMIN = web.AppKey("admin", AdminWatcher)


async def health(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if request.query_string:  # ?verbose, ?exclude=: off the hot path, still no probing
        return health_detail(request, state)
    code, text = health_response(state.answer(now()))
    return web.Response(status=code, text=text, headers=NO_STORE)


async def live(request: web.Request) -> web.Response:
    code, text = live_response(request.app[STATE].answer(now()))
    return web.Response(status=code, text=text, headers=NO_STORE)


def verbose_lines(snap: Snapshot, answer: Answer, t: float, excluded: frozenset[str], reasons: bool,
                  group: str | None = None) -> list[str]:
    """One line per check as kube-apiserver's /readyz?verbose (a group's checks only, for a group), then
    the agent's own conditions."""

    def failed(text: str) -> str:
        return one_line(text) if reasons else "reason withheld"

    lines = []
    members = None if group is None else snap.groups[group].members
    for v in snap.checks:
        if members is not None and v.name not in members:
            continue
        if v.name in excluded:
            lines.append(f"[+]{v.name} excluded: ok")
        elif check_up(answer.fresh, v, t):
            lines.append(f"[+]{v.name} ok")
        else:
            note = "" if v.critical else " (not critical)"
            lines.append(f"[-]{v.name} failed{note}: {failed(check_reason(answer.fresh, v, t))}")
    # Names with ':' cannot clash with a check's name, and cannot be excluded.
    if answer.agent_reason:
        lines.append(f"[-]agent:serving failed: {failed(answer.agent_reason)}")
    elif not answer.healthy and not answer.failing:
        lines.append(f"[-]agent:serving failed: {failed(answer.down_reason)}")
    else:
        lines.append("[+]agent:serving ok")
    if answer.admin is Admin.READY:
        lines.append("[+]agent:admin ok")
    else:
        lines.append(f"[-]agent:admin failed: {failed(admin_text(answer.admin, answer.admin_reason))}")
    unknown = sorted(excluded - {v.name for v in snap.checks})
    if unknown:  # quoted: a name from the query string must not be able to forge a line
        names = ", ".join(json.dumps(n) for n in unknown)
        lines.append(f"warn: some health checks cannot be excluded: no matches for {names}")
    return lines


def health_detail(request: web.Request, state: AgentState, group: str | None = None) -> web.Response:
    excluded = frozenset(name for name in request.query.getall("exclude", ()) if name)
    t = now()
    snap = state.snapshot
    answer = decide(excluding(snap, excluded, t, group), state.condition, t, group)
    code, text = health_response(answer)
    if "verbose" not in request.query:
        return web.Response(status=code, text=text, headers=NO_STORE)
    reasons = authorized(request, request.app[TOKENS].get("status"))
    lines = verbose_lines(snap, answer, t, excluded, reasons, group)
    lines.append("healthz check passed" if code == 200 else "healthz check failed")
    lines = mask_all(lines, state.config.secrets())
    return web.Response(status=code, text="\n".join(lines) + "\n", headers=NO_STORE)


async def one_check(request: web.Request) -> web.Response:
    """/health/<name>: a verdict group's verdict, served as /health serves the node's; or else one check's
    own state, whatever the others and the admin state say. Groups and checks share one namespace."""
    state = request.app[STATE]
    if request.match_info["check"] in state.snapshot.groups:
        group = request.match_info["check"]
        if request.query_string:
            return health_detail(request, state, group)
        code, text = health_response(state.answer(now(), group))
        return web.Response(status=code, text=text, headers=NO_STORE)
    t = now()
    snap, answer = state.snapshot, state.answer(t)
    name = request.match_info["check"]
    v = next((v for v in snap.checks if v.name == name), None)
    if v is None:
        return web.Response(status=404, text=f"unknown check: {json.dumps(name)}\n", headers=NO_STORE)
    if check_up(answer.fresh, v, t):
        return web.Response(text="up\n", headers=NO_STORE)
    text = "down\n"
    if authorized(request, request.app[TOKENS].get("status")):
        text = mask_all(f"down: {one_line(check_reason(answer.fresh, v, t))}\n", state.config.secrets())
    return web.Response(status=503, text=text, headers=NO_STORE)


def check_entry(v: CheckView, t: float, fresh: bool = True) -> dict[str, Any]:
    """One check's entry in /status at `t`; `fresh` is whether the agent can vouch (agent.serving.decision.Answer.fresh)."""
    s = v.state
    last = s.last
    obs = last.observation if last else None
    up = check_up(fresh, v, t)
    entry: dict[str, Any] = {
        "componentId": v.name,
        "componentType": v.type,
        "status": "pass" if up else "fail",
        "critical": v.critical,
        "state": check_state(v, t),
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
        entry["durationSeconds"] = tidy(last.duration)
    if obs is not None:
        entry["observedValue"] = None if obs.value is None else tidy(obs.value)
        entry["observedUnit"] = obs.unit
        if obs.detail:
            entry["detail"] = obs.detail
        if obs.headroom is not None:
            entry["headroom"] = obs.headroom
    if not up:
        entry["output"] = check_reason(fresh, v, t)
    return entry


def status_body(state: AgentState, snap: Snapshot, answer: Answer, t: float, detailed: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"status": "pass" if answer.up else "fail"}
    if not detailed:
        return body
    body.update({
        "version": "1",
        "releaseId": __version__,
        "serviceId": socket.gethostname(),
        "description": "healthgate node verdict",
        "output": answer.reason,
        "healthgate": {
            "verdict": "up" if answer.up else "down",
            "admin": answer.admin.value,
            "adminReason": answer.admin_reason,
            "adminUntil": iso(state.admin_until),
            "adminStateFile": os.path.abspath(state_path(state.config.agent.state_dir)),  # `maint` confirms it
            "since": iso(snap.since_wall),
            "live": answer.live,
            "eventLoopLagSeconds": tidy(snap.loop_lag),
            "failing": list(answer.failing),
            "state": answer.state,
            "time": iso(time.time()),
        },
        "checks": {f"{v.name}:{v.type}": [check_entry(v, t, answer.fresh)] for v in snap.checks},
    })
    if snap.groups:
        body["groups"] = {g: group_entry(state, snap, g, t) for g in snap.groups}
    guard = state.condition.guard
    if guard is not None and state.guard is not None:
        body["guard"] = guard_entry(guard, state.guard.cfg.group)
        if answer.held:
            body["output"] = answer.note
    return body


def guard_entry(view: GuardView, store_group: str) -> dict[str, Any]:
    """A fleet guard's view in /status: the node's (`guard`), or a verdict group's (`groups.NAME.guard`)."""
    return {"state": view.state, "serving": view.serve, "reasons": list(view.reasons), "group": store_group,
            "expected": view.expected, "servingMembers": view.serving, "budget": view.budget,
            "storeOk": view.store_ok, "storeError": view.store_error, "words": view.words()}


def group_entry(state: AgentState, snap: Snapshot, group: str, t: float) -> dict[str, Any]:
    answer, g = decide(snap, state.condition, t, group), snap.groups[group]
    until = state.group_admin.get(group, (Admin.READY, "", None))[2]
    return {"status": "pass" if answer.up else "fail", "state": answer.state, "output": answer.reason,
            "failing": list(answer.failing), "checks": [v.name for v in snap.checks if v.name in g.members],
            # the group's own (`drain --group`), named as the node's are under "healthgate"
            "admin": g.admin.value, "adminReason": g.admin_reason, "adminUntil": iso(until),
            **held_fields(state, group, answer)}


def held_fields(state: AgentState, group: str, answer: Answer) -> dict[str, Any]:
    """With [fleet], a group's own guard (its budget apart from the node's); `output` says so while it holds."""
    view, guard = state.condition.group_guards.get(group), state.group_guards.get(group)
    if view is None or guard is None:
        return {}
    return {"guard": guard_entry(view, guard.cfg.group), **({"output": answer.note} if answer.held else {})}


async def status(request: web.Request) -> web.Response:
    state = request.app[STATE]
    t = now()
    snap, answer = state.snapshot, state.answer(t)
    code = 200 if answer.up else 503
    if prefers_html(request.headers.get("Accept", "")):
        return await page(request, code)
    detailed = authorized(request, request.app[TOKENS].get("status"))
    body = status_body(state, snap, answer, t, detailed)
    # Results are masked already; this also covers thresholds and admin reasons. Before serialising.
    body = mask_all(body, state.config.secrets())
    return web.json_response(body, status=code, content_type=HEALTH_JSON,
                             headers={**NO_STORE, "Vary": "Accept"}, dumps=dumps)


async def metrics(request: web.Request) -> web.Response:
    """The exposition, rendered from the state at scrape time.

    A flood of pipelined scrapes (aiohttp runs the handlers of one connection back to back, eagerly on
    Python 3.12+) must not stall the loop, or the agent would fail closed for junk traffic: the handler
    yields first, so the heartbeat and the probes run between two renders.
    """
    from prometheus_client import CollectorRegistry

    from agent.serving.metrics import render

    registry = request.app[REGISTRY]
    assert isinstance(registry, CollectorRegistry)  # make_app's caller gives one to an app that serves /metrics
    await asyncio.sleep(0)
    return web.Response(body=render(registry),
                        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8", **NO_STORE})


ADMIN_ACTIONS = {"drain": Admin.DRAIN, "maint": Admin.MAINT, "ready": Admin.READY}
ADMIN_WRITE_TIMEOUT = 5.0


async def admin_action(request: web.Request) -> web.Response:
    """POST /admin/{drain,maint,ready}?for=10m&reason=...&group=api: the CLI's drain/maint/ready over HTTP,
    for the node or (`group`, as `--group`) for one verdict group.

    Over TCP, without an admin token configured these paths do not exist (404), for every method and
    client, loopback included: nothing changes state over the network unless an operator opted in. Over
    the admin socket no token is asked for: its file mode already decided who may connect.
    """
    token = request.app[TOKENS].get("admin")
    admin = ADMIN_ACTIONS.get(request.match_info["action"])
    local = is_unix(request.transport)
    if not (token or local) or admin is None:
        raise web.HTTPNotFound()
    if request.method != "POST":
        raise web.HTTPMethodNotAllowed(request.method, ["POST"])
    ok = True if local else bearer(request, token)
    if ok is None:
        return web.json_response({"error": "a bearer token is required"}, status=401, headers={
            "WWW-Authenticate": 'Bearer realm="healthgate"', **NO_STORE})
    if not ok:  # RFC 6750: an invalid token is a 401 too, so every bad credential looks the same
        return web.json_response({"error": "wrong token"}, status=401, headers={
            "WWW-Authenticate": 'Bearer realm="healthgate", error="invalid_token"', **NO_STORE})
    unknown = sorted(set(request.query) - {"for", "reason", "group"})
    if unknown:
        return web.json_response({"error": f"unknown parameter(s): {', '.join(unknown)}"}, status=400)
    group = request.query.get("group")
    groups = request.app[STATE].config.groups
    if group is not None and group not in groups:
        return web.json_response({"error": unknown_group_error(group, groups)}, status=400)
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
    record = make_record(admin, reason, duration, source="socket" if local else "http")
    try:
        async with asyncio.timeout(ADMIN_WRITE_TIMEOUT):  # a hung state directory must not hang the request
            path = await request.app[ADMIN].write(record, group)
    except AdminWriteError as e:
        return web.json_response({"error": str(e)}, status=500, headers=NO_STORE)
    except TimeoutError:
        return web.json_response({"error": f"the state directory did not answer within {ADMIN_WRITE_TIMEOUT:g}s; "
                                           "the change may still apply"},
                                 status=503, headers=NO_STORE)
    answer = {"admin": record.admin.value, "reason": record.reason, "until": iso(record.until),
              "stateFile": str(path)}
    if group is not None:
        answer["group"] = group
    return web.json_response(answer, headers=NO_STORE)


def unknown_group_error(name: str, groups: Iterable[str]) -> str:
    """The one wording for a group name the config does not have, wherever one is asked for."""
    return f"group: no group named {json.dumps(name)} (known: {', '.join(groups) or 'none'})"


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
    app[REFUSED] = Throttled("bad_credentials", every=60.0)
    for path in ("/health", "/ready"):
        app.router.add_get(path, health)  # add_get also answers HEAD
        app.router.add_get(path + "/{check}", one_check)
    app.router.add_get("/live", live)
    app.router.add_get("/status", status)
    app.router.add_get("/metrics", metrics)
    add_routes(app)
    app.router.add_route("*", "/admin/{action}", admin_action)
    return app

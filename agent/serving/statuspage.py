"""The status page (GET /, or /status asked for as HTML) and the transition journal (GET /status/journal)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import re
from dataclasses import dataclass
from importlib import resources
from typing import Any

from aiohttp import web

from agent import logs
from agent.serving.httpcommon import NO_STORE, STATE, TOKENS, authorized, dumps, iso
from agent.text import mask_all

PAGE_FILE = "static/status.html"
JSON_TYPES = ("application/json", "application/health+json", "application/*", "*/*")
HTML_TYPES = ("text/html", "text/*")
DENIED = ("status details: the admin socket or a trusted network only, or send "
          "Authorization: Bearer <status token>\n")


@dataclass(frozen=True, slots=True)
class Page:
    body: bytes
    headers: dict[str, str]


PAGE = web.AppKey("status_page", Page)


def _csp_hash(html: str, tag: str) -> str:
    """The CSP source for the one inline <tag> element: only that exact text may run or style."""
    m = re.search(rf"<{tag}>(.*?)</{tag}>", html, re.S)
    if m is None:
        return "'none'"
    digest = hashlib.sha256(m.group(1).encode()).digest()
    return f"'sha256-{base64.b64encode(digest).decode()}'"


def load_page() -> Page:
    """Read the page once, at startup. A missing file is a packaging bug: logged, and / answers 500."""
    try:
        html = resources.files("agent.serving").joinpath(PAGE_FILE).read_text(encoding="utf-8")
    except OSError as e:
        logs.event("status_page_missing", logging.ERROR, file=PAGE_FILE, error=str(e))
        html = ""
    # The page may talk to its own origin and nothing else: no CDN, no font or image host.
    csp = (f"default-src 'none'; script-src {_csp_hash(html, 'script')}; style-src {_csp_hash(html, 'style')}; "
           "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return Page(html.encode(), {
        **NO_STORE, "Content-Type": "text/html; charset=utf-8", "Content-Security-Policy": csp,
        "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Vary": "Accept",
    })


def prefers_html(accept: str) -> bool:
    """True when the Accept header ranks HTML above JSON. A tie, `*/*` or no header keeps JSON."""
    html_q = json_q = 0.0
    for part in accept.split(","):
        media, *params = (p.strip() for p in part.split(";"))
        q = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        media = media.lower()
        if media in HTML_TYPES:
            html_q = max(html_q, q)
        elif media in JSON_TYPES:
            json_q = max(json_q, q)
    return html_q > 0 and html_q > json_q


def _denied() -> web.Response:
    return web.Response(status=401, text=DENIED, headers={**NO_STORE, "WWW-Authenticate": 'Bearer realm="healthgate"'})


async def page(request: web.Request, code: int | None = None) -> web.Response:
    """The page, with the status code /status would give: 200 only while the node is served UP."""
    if not authorized(request, request.app[TOKENS].get("status")):
        return _denied()
    p = request.app[PAGE]
    if not p.body:
        return web.Response(status=500, text="the status page is missing from this installation\n", headers=NO_STORE)
    if code is None:
        code = 200 if request.app[STATE].answer(asyncio.get_running_loop().time()).up else 503
    return web.Response(status=code, body=p.body, headers=p.headers)


def journal_body(entries: Any) -> dict[str, Any]:
    """The journal as JSON, oldest first; times as ISO 8601 UTC."""
    return {"entries": [{**e, "time": iso(e["time"])} for e in entries]}


async def journal(request: web.Request) -> web.Response:
    if not authorized(request, request.app[TOKENS].get("status")):
        return _denied()
    state = request.app[STATE]
    body = mask_all(journal_body(list(state.journal)), state.config.secrets())
    return web.json_response(body, headers=NO_STORE, dumps=dumps)


def add_routes(app: web.Application) -> None:
    app[PAGE] = load_page()
    app.router.add_get("/", page)
    app.router.add_get("/status/journal", journal)

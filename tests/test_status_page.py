"""The status page in real headless Chromium, its journal endpoint, content negotiation and access rule."""

from __future__ import annotations

import asyncio
import json
import re
import tomllib
import types
from fnmatch import fnmatch
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from agent.cli.admin import set_admin_cli
from agent.config import parse_config
from agent.model import Admin
from agent.serving import statuspage
from agent.serving.httpcommon import TOKENS
from agent.serving.statuspage import add_routes, prefers_html
from tests.browser import Browser
from tests.helpers import PASSING, ROOT, async_wait_for, free_port, require

ARTIFACTS = ROOT / "tests" / "artifacts"

ROWS = """[...document.querySelectorAll('#checks tr')].map(tr => ({
  id: tr.dataset.check, status: tr.dataset.status, pill: tr.querySelector('.pill').textContent,
  why: tr.querySelector('.why').textContent, value: tr.querySelector('.c-value .num').textContent,
  threshold: tr.querySelector('.thr').textContent, streak: tr.querySelector('.c-streak').textContent,
  strip: tr.querySelectorAll('.strip i.p, .strip i.f').length}))"""
BANNER = """({state: document.getElementById('banner').dataset.state,
  verdict: document.getElementById('verdict').textContent, since: document.getElementById('since').textContent,
  reason: document.getElementById('reason').textContent, marker: window.__sameDocument || null,
  journal: [...document.querySelectorAll('#journal li')].map(li => li.textContent)})"""


def fast(name: str, **kw) -> dict:
    return {"name": name, "interval": "200ms", "timeout": "150ms", "rise": 1, "fall": 1, "jitter": 0, **kw}


@pytest.fixture
async def browser():
    b = await Browser(require("chromium", "chromium")).start()
    try:
        yield b
    finally:
        await b.close()


async def test_page_shows_checks_and_updates_in_place(start_agent, browser) -> None:
    """In Chromium the page shows a passing and a failing row, turns UP in place when the failing check
    recovers, says "agent unreachable" when the agent goes away, and asks nothing of any other origin."""
    port = free_port()
    agent = await start_agent({"checks": [fast("mem", type="memory", max_used_percent=100),
                                          fast("db", type="tcp", port=port)]})
    await async_wait_for(lambda: _down_with_results(agent), what="first results")

    status, body = await agent.get("/")
    assert status == 503 and len(body.encode()) < 50 * 1024  # the page carries the verdict's code

    await browser.send("Network.enable")
    await browser.send("Page.enable")
    await browser.send("Page.navigate", url=agent.url + "/")

    async def rows(want: dict[str, str]):
        got = await browser.evaluate(ROWS)
        return got if {r["id"]: r["status"] for r in got} == want else None

    down = await async_wait_for(lambda: rows({"mem:memory": "pass", "db:tcp": "fail"}), timeout=20, what="rows")
    mem, db = down
    assert (mem["pill"], db["pill"]) == ("UP", "DOWN")
    assert db["why"] == f"tcp 127.0.0.1:{port}: connection refused"
    assert "% used" in mem["value"] and mem["threshold"] == "pass: used <= 100%"
    assert db["streak"].startswith("✓ 0 / ✗ ") and mem["strip"] >= 1
    banner = await browser.evaluate(BANNER)
    assert (banner["state"], banner["verdict"]) == ("down", "DOWN")
    assert banner["reason"].startswith("db: tcp 127.0.0.1:") and banner["since"].startswith("since ")
    await browser.evaluate("window.__sameDocument = 'still here'")
    await browser.screenshot(ARTIFACTS / "status-page-down.png")

    listener = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", port)
    try:
        await async_wait_for(lambda: rows({"mem:memory": "pass", "db:tcp": "pass"}), timeout=10, what="recovery")
        banner = await async_wait_for(lambda: _banner(browser, "up"), timeout=10, what="banner UP")
        assert banner["verdict"] == "UP" and banner["marker"] == "still here"  # updated in place, no reload
        assert any("db" in j and "down → up" in j for j in banner["journal"]), banner["journal"]
        await browser.screenshot(ARTIFACTS / "status-page-up.png")

        await browser.send("Emulation.setDeviceMetricsOverride", width=390, height=844, deviceScaleFactor=2,
                           mobile=True)
        await async_wait_for(lambda: browser.evaluate("innerWidth === 390"), what="phone viewport")
        overflow = await browser.evaluate("document.documentElement.scrollWidth - innerWidth")
        assert overflow <= 0, f"the page is {overflow}px wider than a phone screen"
        await browser.screenshot(ARTIFACTS / "status-page-phone.png")
        await browser.send("Emulation.clearDeviceMetricsOverride")
        await browser.send("Emulation.setEmulatedMedia", features=[{"name": "prefers-color-scheme", "value": "dark"}])
        await browser.screenshot(ARTIFACTS / "status-page-dark.png")
    finally:
        listener.close()

    await agent.agent.stop()
    banner = await async_wait_for(lambda: _banner(browser, "unreachable"), timeout=10, what="unreachable")
    assert "agent unreachable" in banner["since"] + banner["reason"] and banner["marker"] == "still here"
    assert banner["verdict"] != "UP"
    await browser.screenshot(ARTIFACTS / "status-page-unreachable.png")

    urls = browser.requested_urls()
    assert urls and all(u.startswith(agent.url + "/") or u.startswith("data:") for u in urls), set(urls)


async def _down_with_results(agent, n: int = 2) -> bool:
    checks = agent.state.snapshot.checks
    return len(checks) == n and all(v.state.last is not None for v in checks)


async def _is_up(agent) -> bool:
    return (await agent.get("/health"))[0] == 200


async def _banner(browser: Browser, state: str):
    b = await browser.evaluate(BANNER)
    return b if b["state"] == state else None


async def test_journal_endpoint_lists_transitions(start_agent) -> None:
    """GET /status/journal returns the verdict and check transitions with reasons, times in ISO 8601."""
    port = free_port()
    agent = await start_agent({"checks": [fast("db", type="tcp", port=port)]})
    await async_wait_for(lambda: _has_entry(agent, "db"), what="a journal entry")
    status, text = await agent.get("/status/journal")
    entries = json.loads(text)["entries"]
    assert status == 200
    db = next(e for e in entries if e["name"] == "db")
    assert (db["kind"], db["from"], db["to"]) == ("check", "unknown", "down")
    assert db["reason"] == f"tcp 127.0.0.1:{port}: connection refused" and db["time"].endswith("Z")


async def _has_entry(agent, name: str) -> bool:
    return any(e["name"] == name for e in agent.state.journal)


async def test_status_serves_the_page_to_browsers_and_json_to_the_rest(start_agent) -> None:
    """/status answers HTML when Accept prefers text/html, JSON otherwise; / is the page; both under 50 KB."""
    agent = await start_agent({"checks": [fast("mem", type="memory", max_used_percent=100)]})
    await async_wait_for(lambda: _is_up(agent), what="up")
    browser_accept = "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,*/*;q=0.8"
    async with agent.session.get(agent.url + "/status", headers={"Accept": browser_accept}) as resp:
        assert resp.status == 200
        html = await resp.text()
        assert resp.content_type == "text/html" and "<title>healthgate</title>" in html
        assert "connect-src 'self'" in resp.headers["Content-Security-Policy"]
    async with agent.session.get(agent.url + "/status", headers={"Accept": "*/*"}) as resp:
        assert resp.content_type == "application/health+json" and "Accept" in resp.headers["Vary"]
    async with agent.session.get(agent.url + "/") as resp:
        assert resp.status == 200 and await resp.text() == html and len(html.encode()) < 50 * 1024


async def test_the_page_carries_the_verdicts_status_code(start_agent) -> None:
    """A browser's GET /status (and /) answers 503 while the node is down, as the JSON answer does: a monitor
    pointed at the page with a browser's Accept header never reads a down node as 200."""
    port = free_port()
    agent = await start_agent({"checks": [fast("db", type="tcp", port=port)]})
    await async_wait_for(lambda: _down_with_results(agent, 1), what="first results")
    browser_accept = "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,*/*;q=0.8"
    for headers in ({"Accept": browser_accept}, {"Accept": "application/json"}):
        async with agent.session.get(agent.url + "/status", headers=headers) as resp:
            assert resp.status == 503, headers
    async with agent.session.get(agent.url + "/") as resp:
        assert resp.status == 503


@pytest.mark.parametrize("accept, html", [
    ("", False),
    ("*/*", False),
    ("application/json", False),
    ("text/html", True),
    ("text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8", True),
    ("application/json, text/html", False),  # a tie keeps the API
    ("text/html;q=0.5, application/json", False),
    ("application/json;q=0.5, text/html", True),
    ("text/html;q=0", False),
    ("text/*", True),
    ("text/html;q=bogus, */*", False),
])
def test_prefers_html(accept: str, html: bool) -> None:
    """Content negotiation of /status: HTML only when the client ranks it above JSON."""
    assert prefers_html(accept) is html


@pytest.mark.parametrize("path", ["/", "/status/journal"])
@pytest.mark.parametrize("auth, code", [(None, 401), ("Bearer wrong", 401), ("Bearer s3cret", 200)])
async def test_page_and_journal_follow_the_status_access_rule(path: str, auth: str | None, code: int) -> None:
    """A non-loopback client gets the page and the journal only with the status bearer token."""
    from agent.serving.httpcommon import STATE

    app = web.Application()
    app[TOKENS] = {"status": "s3cret"}
    app[STATE] = type("S", (), {"journal": [], "config": parse_config({"checks": [PASSING]}),
                                "answer": lambda self, now: type("A", (), {"up": True})()})()
    add_routes(app)
    transport = type("T", (), {"get_extra_info": lambda self, k, d=None: ("192.0.2.7", 40000) if k == "peername" else d})()
    req = make_mocked_request("GET", path, headers={"Authorization": auth} if auth else {}, app=app,
                              transport=transport)
    match = await app.router.resolve(req)
    resp = await match.handler(req)
    assert resp.status == code
    if code == 401:
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")


def test_page_is_package_data() -> None:
    """The page ships in the wheel: pyproject's package-data covers agent/serving/static/status.html."""
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["agent.serving"]
    rel = Path(statuspage.PAGE_FILE)
    assert (ROOT / "agent" / "serving" / rel).is_file() and any(fnmatch(str(rel), pat) for pat in data)


HOSTILE = '<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script>\x1b[2J'


async def test_a_hostile_reason_is_shown_as_text(start_agent, browser) -> None:
    """A reason carrying markup and escapes is shown as literal text on the page: no element is made of it,
    no script of it runs (textContent under a strict CSP), and the escape arrives made visible."""
    from agent.probes import PROBES
    from agent.probes.base import CheckFailed

    async def hostile(cfg, ctx):
        raise CheckFailed(HOSTILE, "error")

    mod = types.ModuleType("hostile")
    mod.Config, mod.probe = PROBES["tcp"].Config, hostile
    agent = await start_agent({"checks": [fast("evil", type="tcp", port=free_port())]}, probes={"tcp": mod})
    await async_wait_for(lambda: _down_with_results(agent, 1), what="the hostile result")
    await browser.send("Page.enable")
    await browser.send("Page.navigate", url=agent.url + "/")

    async def row():
        got = await browser.evaluate(ROWS)
        return got[0] if got and got[0]["why"] else None

    shown = await async_wait_for(row, timeout=20, what="the row")
    assert shown["why"] == HOSTILE.replace("\x1b", "\\x1b")
    assert await browser.evaluate("window.__pwned === undefined && document.querySelectorAll('img').length === 0")


GROUP_ROWS = """[...document.querySelectorAll('#groups tr')].map(tr => ({
  name: tr.dataset.group, verdict: tr.querySelector('.pill').textContent, why: tr.querySelector('.why').textContent,
  admin: tr.querySelector('.g-admin').textContent, checks: tr.querySelector('.g-checks').textContent}))"""


async def _group_admin_is(agent, group: str, admin: Admin) -> bool:
    return agent.state.snapshot.groups[group].admin is admin


async def test_page_shows_each_verdict_group(start_agent, browser) -> None:
    """With verdict groups the page lists each one: name, UP or DOWN with the failing check's reason, its own
    admin state (drained alone, with the reason), and its member checks; without groups the section is hidden."""
    port = free_port()
    agent = await start_agent({"checks": [fast("mem", type="memory", max_used_percent=100),
                                          fast("db", type="tcp", port=port)],
                               "groups": {"api": {"checks": ["db", "mem"]}, "static": {"checks": ["mem"]}}})
    await async_wait_for(lambda: _down_with_results(agent), what="first results")
    # Through the state file, as `healthgate drain --group` does: the admin watcher owns the admin fields.
    assert set_admin_cli(agent.state.config.agent.state_dir, "drain", "reindex", None, group="static")[0]
    await async_wait_for(lambda: _group_admin_is(agent, "static", Admin.DRAIN), what="static drained")
    await browser.send("Page.enable")
    await browser.send("Page.navigate", url=agent.url + "/")

    async def rows():
        got = await browser.evaluate(GROUP_ROWS)
        return got if len(got) == 2 and got[0]["why"] else None

    api, static = await async_wait_for(rows, timeout=20, what="group rows")
    assert (api["name"], api["verdict"], api["admin"], api["checks"]) == ("api", "DOWN", "ready", "mem, db")
    assert api["why"] == f"db: tcp 127.0.0.1:{port}: connection refused"
    assert (static["name"], static["verdict"], static["admin"], static["checks"]) == ("static", "UP",
                                                                                      "drain · reindex", "mem")
    assert await browser.evaluate("!document.getElementById('groups-section').hidden")
    await browser.screenshot(ARTIFACTS / "status-page-groups.png")


async def test_the_groups_section_is_hidden_without_groups(start_agent, browser) -> None:
    """A config without groups shows no groups section."""
    agent = await start_agent({"checks": [fast("mem", type="memory", max_used_percent=100)]})
    await browser.send("Page.enable")
    await browser.send("Page.navigate", url=agent.url + "/")
    await async_wait_for(lambda: browser.evaluate("document.querySelectorAll('#checks tr').length === 1"),
                         timeout=20, what="the check row")
    assert await browser.evaluate("document.getElementById('groups-section').hidden")


# Where the failing row's reason puts the address: one line box per piece of it, and the row's texts.
ADDRESS_LINES = """(() => {
  const why = document.querySelector('tr[data-status=fail] .why');
  const text = why.firstChild, at = text.data.indexOf('127.0.0.1:');
  const range = document.createRange();
  range.setStart(text, at); range.setEnd(text, text.data.indexOf(':', at + 10) + 1);
  const tops = new Set([...range.getClientRects()].map(r => Math.round(r.top)));
  const lines = new Set([...(() => { const r = document.createRange(); r.selectNodeContents(why);
    return r.getClientRects(); })()].map(r => Math.round(r.top)));
  return {address: tops.size, lines: lines.size, threshold: document.querySelector('tr[data-status=fail] .thr').textContent,
          since: document.getElementById('since').textContent,
          change: document.querySelector('tr[data-status=fail] .change .num').textContent};
})()"""


async def test_failing_row_reads_plainly_at_any_width(start_agent, browser) -> None:
    """A failing row's threshold does not read "pass: ...", its reason wraps between words and never inside
    an address such as 127.0.0.1:6390, at desktop and phone widths, and the times name their zone."""
    port = free_port()
    agent = await start_agent({"checks": [fast("mem", type="memory", max_used_percent=100),
                                          fast("cache-with-a-rather-long-name", type="redis", port=port)]})
    await async_wait_for(lambda: _down_with_results(agent), what="first results")
    await browser.send("Page.enable")
    for width, mobile in ((820, False), (390, True), (320, True)):
        await browser.send("Emulation.setDeviceMetricsOverride", width=width, height=900, deviceScaleFactor=1,
                           mobile=mobile)
        await browser.send("Page.navigate", url=agent.url + "/")
        got = await async_wait_for(lambda: browser.evaluate(
            "document.querySelector('tr[data-status=fail] .why')?.textContent ? " + ADDRESS_LINES + " : null"),
            timeout=20, what="a failing row")
        assert got["address"] == 1, (width, got)
        assert got["threshold"] == "needs: PING answered, not loading"
        assert re.search(r"since \d\d:\d\d:\d\d [A-Z][A-Za-z0-9+:-]* ", got["since"]), got["since"]
    await browser.screenshot(ARTIFACTS / "status-page-narrow.png")

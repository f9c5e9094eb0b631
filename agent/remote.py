"""`healthgate status` and `explain`: ask a running agent over HTTP and print what it answers."""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from typing import Any

from agent import render
from agent.config import Config
from agent.fields import format_listen

EXIT_UP, EXIT_DOWN, EXIT_UNKNOWN = 0, 2, 3
DEFAULT_URL = "http://127.0.0.1:8080"


class Unreachable(Exception):
    """No usable answer: refused, timed out, not HTTP, not JSON."""


class Denied(Exception):
    """The agent answered but withholds details from this client."""


def default_url(cfg: Config | None) -> str:
    """The agent's own listen address, with a wildcard host turned into loopback."""
    if cfg is None:
        return DEFAULT_URL
    host, port = cfg.server.listen
    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"http://{format_listen((host, port))}"


def fetch_json(url: str, token: str | None, timeout: float) -> dict[str, Any]:
    headers = {"Accept": "application/json", "User-Agent": "healthgate-cli"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    # No proxy: the agent is asked directly, whatever http_proxy says.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(urllib.request.Request(url, headers=headers), timeout=timeout) as resp:
            raw = resp.read()
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            raise Denied(f"HTTP {e.code}") from None
        if e.code != 503:  # /status answers 503 with its full body when the node is down
            raise Unreachable(f"HTTP {e.code} from {url}") from None
        raw = e.read()
    except urllib.error.URLError as e:
        reason = e.reason
        raise Unreachable(getattr(reason, "strerror", None) or str(reason)) from None
    except (TimeoutError, OSError) as e:
        raise Unreachable(f"no answer within {timeout:g}s" if isinstance(e, TimeoutError) else str(e)) from None
    try:
        body = json.loads(raw)
    except ValueError:
        raise Unreachable(f"{url} did not answer JSON: is it a healthgate agent?") from None
    if not isinstance(body, dict):
        raise Unreachable(f"{url} answered unexpected JSON")
    return body


def ask(base: str, token: str | None, timeout: float, journal: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    base = base.rstrip("/")
    status = fetch_json(base + "/status", token, timeout)
    if "healthgate" not in status:
        raise Denied("no details")
    entries = fetch_json(base + "/status/journal", token, timeout) if journal else {}
    return status, entries


def _report(base: str, e: Exception) -> int:
    if isinstance(e, Denied):
        print(f"NOT AUTHORIZED  {base}\nthe agent withholds status details from this client ({e}): run this on "
              "the node itself, or pass --token-file with the status token", file=sys.stderr)
    else:
        print(render.unreachable(base, str(e)), file=sys.stderr)
    return EXIT_UNKNOWN


def run_status(base: str, token: str | None, timeout: float, color: bool, transitions: int) -> int:
    try:
        status, journal = ask(base, token, timeout, journal=transitions > 0)
    except (Unreachable, Denied) as e:
        return _report(base, e)
    print(render.status_report(status, journal, color, transitions))
    return render.exit_code(status)


def run_explain(base: str, token: str | None, timeout: float) -> int:
    try:
        status, _ = ask(base, token, timeout, journal=False)
    except (Unreachable, Denied) as e:
        return _report(base, e)
    print(render.explain(status))
    return render.exit_code(status)

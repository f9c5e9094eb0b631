"""`healthgate status`, `explain`, `drain`...: ask a running agent over its admin socket, else HTTP."""

from __future__ import annotations

import http.client
import json
import os
import socket
import stat
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from agent.cli import render
from agent.config import Config
from agent.fields import format_listen

EXIT_UP, EXIT_DOWN, EXIT_UNKNOWN = 0, 2, 3
DEFAULT_URL = "http://127.0.0.1:8080"


class Unreachable(Exception):
    """No usable answer: refused, timed out, not HTTP, not JSON."""


class Denied(Exception):
    """The agent answered but withholds details from this client."""


def admin_socket(cfg: Config | None) -> str | None:
    """The config's admin socket when one is there to connect to, else None (then HTTP and the token)."""
    path = cfg.admin_socket() if cfg is not None else None
    try:
        return path if path and stat.S_ISSOCK(os.stat(path).st_mode) else None
    except OSError:
        return None


def agent_url(text: str) -> str:
    """--url as given, with http:// when it names no scheme (127.0.0.1:8080, [::1]:8080, localhost:8080)."""
    text = text.strip()
    return text if "://" in text else f"http://{text}"


def default_url(cfg: Config | None) -> str:
    """The agent's own listen address, with a wildcard host turned into loopback."""
    if cfg is None:
        return DEFAULT_URL
    host, port = cfg.server.listen
    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"http://{format_listen((host, port))}"


class _UnixConnection(http.client.HTTPConnection):
    """HTTP over the agent's admin socket."""

    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def unix_request(path: str, method: str, target: str, headers: dict[str, str], timeout: float) -> tuple[int, bytes]:
    conn = _UnixConnection(path, timeout)
    try:
        conn.request(method, target, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def open_url(url: str, headers: dict[str, str], timeout: float) -> Any:
    """GET `url` from the agent directly, never through a proxy whatever http_proxy says: a proxy's loopback
    is not this host's, and a proxy must not see the status token. urllib's response and errors, as urlopen's."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    return opener.open(urllib.request.Request(url, headers=headers), timeout=timeout)


def fetch_json(url: str, token: str | None, timeout: float, sock: str | None = None) -> dict[str, Any]:
    """GET `url` as JSON; over the admin socket at `sock` when given (then `url` is only a path)."""
    headers = {"Accept": "application/json", "User-Agent": "healthgate-cli"}
    if token and sock is None:  # the socket needs none, and a token is never sent where it is not needed
        headers["Authorization"] = f"Bearer {token}"
    if sock is not None:
        try:
            code, raw = unix_request(sock, "GET", url, headers, timeout)
        except TimeoutError:
            raise Unreachable(f"no answer within {timeout:g}s") from None
        except (OSError, http.client.HTTPException) as e:
            raise Unreachable(getattr(e, "strerror", None) or str(e) or type(e).__name__) from None
        if code in (401, 403):
            raise Denied(f"HTTP {code}")
        if code not in (200, 503):
            raise Unreachable(f"HTTP {code} from {sock}")
        return _json(raw, sock)
    try:
        with open_url(url, headers, timeout) as resp:
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
    return _json(raw, url)


def _json(raw: bytes, where: str) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except ValueError:
        raise Unreachable(f"{where} did not answer JSON: is it a healthgate agent?") from None
    if not isinstance(body, dict):
        raise Unreachable(f"{where} answered unexpected JSON")
    return body


def post_admin(sock: str, action: str, reason: str, duration: float | None, timeout: float,
               group: str | None = None) -> tuple[bool, str]:
    """POST /admin/<action>[?group=NAME] over the admin socket: the agent writes the state file and applies
    it at once, for the node or one verdict group. (ok, one line to print)."""
    query = {"reason": reason} if reason else {}
    if duration:
        query["for"] = f"{duration:g}s"
    if group is not None:
        query["group"] = group
    target = f"/admin/{action}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    try:
        code, raw = unix_request(sock, "POST", target, {"User-Agent": "healthgate-cli"}, timeout)
        body = json.loads(raw)
    except (OSError, http.client.HTTPException, ValueError) as e:
        return False, f"healthgate: the agent at {sock} did not answer: {getattr(e, 'strerror', None) or e}"
    if code != 200 or not isinstance(body, dict):
        return False, f"healthgate: the agent at {sock} refused: {body.get('error') if isinstance(body, dict) else code}"
    until = f" until {body['until']}" if body.get("until") else ""
    what = body.get("admin") if group is None else f"{body.get('admin')} group {body.get('group')}"
    return True, f"{what}{until}: {body.get('reason')} ({body.get('stateFile')}, applied by the agent)"


def ask(base: str, token: str | None, timeout: float, journal: bool,
        sock: str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    base = "" if sock else base.rstrip("/")
    status = fetch_json(base + "/status", token, timeout, sock)
    if "healthgate" not in status:
        raise Denied("no details")
    entries = fetch_json(base + "/status/journal", token, timeout, sock) if journal else {}
    return status, entries


def _report(base: str, e: Exception) -> int:
    if isinstance(e, Denied):
        print(f"NOT AUTHORIZED  {render.printable(base)}\nthe agent withholds status details from this client "
              f"({e}): run this on the node as a member of the agent's group (its admin socket), or pass "
              "--token-file with the status token", file=sys.stderr)
    else:
        print(render.unreachable(base, str(e)), file=sys.stderr)
    return EXIT_UNKNOWN


def _no_such_group(status: dict[str, Any], group: str | None) -> bool:
    """True (and said on stderr) when `--group` names a group the agent does not have: its state is
    unknown from here, as for an agent that cannot be asked."""
    if group is None or group in (status.get("groups") or {}):
        return False
    print(render.unknown_group(status, group), file=sys.stderr)
    return True


def run_status(base: str, token: str | None, timeout: float, color: bool, transitions: int,
               sock: str | None = None, group: str | None = None, width: int | None = None) -> int:
    try:
        status, journal = ask(base, token, timeout, journal=transitions > 0, sock=sock)
    except (Unreachable, Denied) as e:
        return _report(sock or base, e)
    if _no_such_group(status, group):
        return EXIT_UNKNOWN
    if group is not None:
        print(render.group_report(status, journal, group, color, transitions))
        return render.group_exit_code(status, group)
    print(render.status_report(status, journal, color, transitions, width))
    return render.exit_code(status)


def run_explain(base: str, token: str | None, timeout: float, sock: str | None = None,
                group: str | None = None) -> int:
    try:
        status, _ = ask(base, token, timeout, journal=False, sock=sock)
    except (Unreachable, Denied) as e:
        return _report(sock or base, e)
    if _no_such_group(status, group):
        return EXIT_UNKNOWN
    if group is not None:
        print(render.explain_group(status, group))
        return render.group_exit_code(status, group)
    print(render.explain(status))
    return render.exit_code(status)

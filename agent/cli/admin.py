"""The drain, maint and ready commands: write the state file, then ask the agent whether it applied it."""

from __future__ import annotations

import http.client
import json
import os
import time
import urllib.error
from pathlib import Path

from agent.admin import (
    AdminRecord,
    AdminWriteError,
    keeping_groups,
    make_record,
    setting_group,
    update_record,
)
from agent.cli.remote import admin_socket, open_url, unix_request
from agent.config import Config
from agent.fields import format_listen
from agent.model import Admin


def who() -> str:  # pragma: no mutate block
    try:
        import pwd

        return pwd.getpwuid(os.geteuid()).pw_name
    except (ImportError, KeyError):
        return f"uid {os.geteuid()}"


def set_admin_cli(state_dir: str, action: str, reason: str, duration: float | None,
                  group: str | None = None) -> tuple[AdminRecord | None, Path | None, str]:  # pragma: no mutate block
    """Write the state file for a command, for the node or for one verdict group: (the record, the file,
    one line to print); None, None and the error when it could not be written."""
    admin = Admin(action)
    record = make_record(admin, reason or f"{action} by {who()}", duration, source="cli")
    change = keeping_groups(record) if group is None else setting_group(group, record)
    try:
        path, _ = update_record(state_dir, change)
    except AdminWriteError as e:
        return None, None, f"healthgate: {e}"
    until = f" until {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(record.until))}" if record.until else ""
    what = action if group is None else f"{action} group {group}"
    return record, path, f"{what}{until}: {record.reason} ({path})"


def _same_file(a: str, b: str) -> bool:  # pragma: no mutate block
    if os.path.abspath(a) == os.path.abspath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def confirm(config: Config, record: AdminRecord, path: Path, timeout: float = 2.0, group: str | None = None) -> str:  # pragma: no mutate block
    """Ask the running agent (its /status on loopback) whether it applied `record`, read from `path`, to the
    node or to one verdict group; "" when it did, else a sentence saying why not.

    Applied means: the agent reads that very file (`adminStateFile`), is in the record's mode (the node's,
    or the group's own: `groups.<name>.admin`), and for drain and maint shows the record's reason, so a
    node already in maintenance from another file or an older write does not pass for a confirmation.
    """
    host, port = config.server.listen
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    url = f"http://{format_listen((host, port))}/status"
    headers = {"Accept": "application/json"}
    token_file = config.server.status_token_file
    if token_file:  # loopback is not trusted: without the admin socket, details need the status token
        try:
            token = Path(token_file).read_text().strip()
        except OSError as e:
            return f"cannot read server.status_token_file {token_file} to ask the agent: {e.strerror or e}"
        if token:
            headers["Authorization"] = f"Bearer {token}"
    sock = admin_socket(config)  # the operators' channel: details without a token
    if sock is not None:
        url = f"{sock} (the admin socket)"
    action = record.admin.value
    deadline = time.monotonic() + timeout
    seen = ""  # what the agent last said, when it answered
    refused = f"the agent did not answer at {url}: connection refused (is it running?)"
    while True:
        silent = ""  # why this attempt got no answer at all
        try:
            if sock is not None:
                body = unix_request(sock, "GET", "/status", {"Accept": "application/json"}, 0.5)[1]
            else:
                try:
                    with open_url(url, headers, 0.5) as resp:
                        body = resp.read()
                except urllib.error.HTTPError as e:  # 503 while down still carries the details
                    body = e.read()
            info = json.loads(body)["healthgate"]
            watched = info.get("adminStateFile")
            if watched is not None and not _same_file(watched, str(path)):
                return (f"the agent at {url} reads {watched}, not {path} (another [agent] state_dir); is it "
                        "running with this config?")
            if group is not None:
                groups = json.loads(body).get("groups", {})
                if group not in groups:
                    return f"the agent at {url} has no group {group!r}; is it running with this config?"
                info = groups[group]
            if info["admin"] == action and (record.admin is Admin.READY or info["adminReason"] == record.reason):
                return ""
            seen = f"{info['admin']} ({info['adminReason']})" if info["adminReason"] else info["admin"]
        except urllib.error.URLError as e:
            if isinstance(e.reason, ConnectionRefusedError):
                return refused
            silent = str(getattr(e.reason, "strerror", None) or e.reason)
        except (ConnectionRefusedError, FileNotFoundError):  # the admin socket of an agent that has gone
            return refused
        except TimeoutError:  # accepted, then silence: a stopped or stalled agent
            silent = "timed out"
        except KeyError:
            seen = "no details (is server.status_token_file the agent's?)"
        except (OSError, http.client.HTTPException) as e:
            silent = getattr(e, "strerror", None) or str(e) or type(e).__name__
        except (ValueError, TypeError):
            seen = "an answer that is not a healthgate agent's /status"
        if time.monotonic() >= deadline:
            if silent:
                return f"the agent did not answer at {url} within {timeout:g}s ({silent})"
            return f"the agent at {url} still reports {seen or 'nothing'} after {timeout:g}s"
        time.sleep(0.05)

"""Drain and maintenance: the state file written by the CLI and the admin endpoints, watched by the agent."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from agent import logs
from agent.config import Config
from agent.fields import format_duration, format_listen
from agent.model import Admin
from agent.state import AgentState

STATE_FILE = "admin.json"
POLL = 0.5  # seconds between looks at the state file: one stat(), a read only when it changed
READ_TIMEOUT = 1.0  # a state directory that hangs (dead network mount) is given up on for this round
REASON_MAX = 200
_SPACE = re.compile(r"\s+")


def sanitize(text: str, limit: int = REASON_MAX) -> str:
    """One line of printable ASCII, at most `limit` characters: safe in a log, a header or HAProxy's reply."""
    text = _SPACE.sub(" ", text)
    text = "".join(c if " " <= c <= "~" else "?" for c in text).strip()
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


@dataclass(frozen=True, slots=True)
class AdminRecord:
    """What an operator asked for. `until` is wall-clock (epoch seconds) on purpose: unlike every other
    duration in the agent, an expiry must survive an agent restart, and a monotonic clock does not."""

    admin: Admin
    reason: str = ""
    until: float | None = None
    set_at: float | None = None
    source: str = ""  # "cli", "http" or "agent" (a record the agent made up when the file was unusable)

    def expired(self, wall: float) -> bool:
        return self.until is not None and wall >= self.until


READY = AdminRecord(Admin.READY)
_UNSEEN = object()


def state_path(state_dir: str | os.PathLike[str]) -> Path:
    return Path(state_dir) / STATE_FILE


def make_record(admin: Admin, reason: str = "", duration: float | None = None, source: str = "",
                wall: float | None = None) -> AdminRecord:
    wall = time.time() if wall is None else wall
    until = wall + duration if duration else None
    return AdminRecord(admin, sanitize(reason), until, wall, source)


def encode(record: AdminRecord) -> bytes:
    return (json.dumps({"admin": record.admin.value, "reason": record.reason, "until": record.until,
                        "set_at": record.set_at, "source": record.source}, indent=2) + "\n").encode()


def decode(raw: bytes) -> AdminRecord:
    """The record in a state file; ValueError for anything that isn't one we wrote."""
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"not JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    try:
        admin = Admin(data.get("admin"))
    except ValueError:
        raise ValueError(f"admin: {data.get('admin')!r} is not one of ready, drain, maint") from None
    until, set_at = data.get("until"), data.get("set_at")
    for key, value in (("until", until), ("set_at", set_at)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise ValueError(f"{key}: not a number")
    reason = data.get("reason", "")
    if not isinstance(reason, str):
        raise ValueError("reason: not a string")
    return AdminRecord(admin, sanitize(reason), None if until is None else float(until),
                       None if set_at is None else float(set_at), sanitize(str(data.get("source", "")), 20))


class AdminWriteError(Exception):
    """The state file could not be written; the message names the file and the system's reason."""


def write_record(state_dir: str | os.PathLike[str], record: AdminRecord) -> Path:
    """Write the state file atomically: a temporary file, fsync, rename over, fsync the directory.

    A reader sees the old file or the new one, never a part of one; a full disk or an unwritable
    directory leaves the old file in place and raises AdminWriteError.
    """
    directory = Path(state_dir)
    path = state_path(directory)
    tmp: str | None = None
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".admin.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o644)  # readable by the agent's user when root runs the command
            f.write(encode(record))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError as e:
        raise AdminWriteError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    return path


def read_record(path: Path) -> AdminRecord:
    """The record in force. No file means ready; a file that can't be read or parsed means MAINT.

    Fail closed: an unusable state file may hide an operator's "maint", and serving traffic against
    the operator's will is the worse mistake. `healthgate ready` rewrites the file and ends it.
    """
    try:
        raw = path.read_bytes()
    except (FileNotFoundError, NotADirectoryError):  # no file can be there, so nobody asked for anything
        return READY
    except OSError as e:
        return AdminRecord(Admin.MAINT, sanitize(f"state file {path} unreadable: {e.strerror or e}"),
                           source="agent")
    try:
        return decode(raw)
    except ValueError as e:
        return AdminRecord(Admin.MAINT, sanitize(f"state file {path} invalid: {e}"), source="agent")


class AdminWatcher:
    """Keeps the state's admin mode in line with the state file, and expires `--for` records.

    Invariant: only this object calls `state.set_admin`, from the event loop; file reads run in a
    thread, one at a time, so a hung state directory stalls neither the loop nor this watcher's
    other rounds for longer than READ_TIMEOUT.
    """

    def __init__(self, state: AgentState):
        self.state = state
        self.record: AdminRecord = READY
        self._sig: object = _UNSEEN  # what the file looked like at the last read
        self._pending: asyncio.Future | None = None
        self._lock = asyncio.Lock()
        self._read_once = False

    @property
    def path(self) -> Path:
        return state_path(self.state.config.agent.state_dir)

    @staticmethod
    def _signature(path: Path) -> tuple:
        try:
            st = path.stat()
        except (FileNotFoundError, NotADirectoryError):
            return ("absent", path)
        except OSError as e:
            return ("error", path, e.errno)
        return ("file", path, st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size)

    def poll(self, force: bool = False) -> AdminRecord | None:
        """Blocking: the record if the file changed since the last look (or `force`), else None.

        A rename gives the file a new inode and mtime, so one cheap stat() tells a change.
        """
        path = self.path
        sig = self._signature(path)
        if not force and sig == self._sig and sig[0] != "error":
            return None
        self._sig = sig
        return read_record(path)

    async def sync(self, force: bool = False) -> bool:
        """Pick up the file now; False when a read is stuck in its thread (the next round catches up).

        Called at startup before anything serves, so maintenance survives a restart; a state directory
        that doesn't answer then means maintenance until it does (fail closed)."""
        async with self._lock:
            if self._pending is not None and not self._pending.done():
                return False
            force = force or self.record.source == "agent"  # a made-up record is re-checked every round
            self._pending = asyncio.ensure_future(asyncio.to_thread(self.poll, force))
            await asyncio.wait((self._pending,), timeout=READ_TIMEOUT)
            if not self._pending.done():
                logs.event("admin_state_slow", logging.WARNING, path=str(self.path),
                           detail=f"reading the state file took over {READ_TIMEOUT:g}s")
                if not self._read_once:  # at startup: we can't tell whether maint was asked for
                    self._take(AdminRecord(Admin.MAINT, f"state file {self.path} not readable within "
                                                        f"{READ_TIMEOUT:g}s", source="agent"))
                    self.apply(time.time())
                return False
            self._read_once = True
            record = self._pending.result()
            if record is not None:
                self._take(record)
            self.apply(time.time())
            return True

    def _take(self, record: AdminRecord) -> None:
        if record == self.record:
            return
        if record.source == "agent":
            logs.event("admin_state_unusable", logging.ERROR, path=str(self.path), reason=record.reason,
                       detail="in maintenance until the file is fixed or `healthgate ready` rewrites it")
        else:
            until = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.until)) if record.until else None
            logs.event("admin_state_read", path=str(self.path), admin=record.admin.value, reason=record.reason,
                       until=until, source=record.source)
        self.record = record

    def apply(self, wall: float) -> None:
        """Put the record in force, or ready once its `--for` has run out."""
        r = self.record
        if r.admin is not Admin.READY and r.expired(wall):
            if self.state.admin is not Admin.READY:
                spent = format_duration(round(r.until - r.set_at, 3)) if r.set_at else "its time"
                self.state.set_admin(Admin.READY, f"{r.admin.value} expired after {spent}")
            return
        reason = r.reason
        if r.admin is Admin.READY and not reason and self.state.admin is not Admin.READY:
            reason = f"ready ({r.source})" if r.source else "ready"
        if r.admin is Admin.READY and self.state.admin is Admin.READY:
            return  # keep the reason of the last transition (an expiry, say) on display
        self.state.set_admin(r.admin, reason, r.until)

    async def run(self) -> None:
        while True:
            try:
                await self.sync()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # one bad round must not end the watcher; the last state stays
                logs.event("admin_watch_error", logging.ERROR, error=repr(e))
            await asyncio.sleep(POLL)


# -- the `healthgate drain | maint | ready` commands --------------------------------------------------

def who() -> str:
    try:
        import pwd

        return pwd.getpwuid(os.geteuid()).pw_name
    except (ImportError, KeyError):
        return f"uid {os.geteuid()}"


def set_admin_cli(state_dir: str, action: str, reason: str, duration: float | None) -> tuple[bool, str]:
    """Write the state file for a command; (written, one line to print)."""
    admin = Admin(action)
    record = make_record(admin, reason or f"{action} by {who()}", duration, source="cli")
    try:
        path = write_record(state_dir, record)
    except AdminWriteError as e:
        return False, f"healthgate: {e}"
    until = f" until {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(record.until))}" if record.until else ""
    return True, f"{action}{until}: {record.reason} ({path})"


def confirm(config: Config, action: str, timeout: float = 2.0) -> str:
    """Ask the running agent (its /status on loopback) whether it applied `action`; "" when it did,
    else a sentence saying why not. The state file is written either way: an agent started later
    picks it up."""
    import urllib.error
    import urllib.request

    host, port = config.server.listen
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    url = f"http://{format_listen((host, port))}/status"
    headers = {"Accept": "application/json"}
    try:  # loopback is not trusted: without the admin socket, details need the status token
        token = Path(config.server.status_token_file).read_text().strip() if config.server.status_token_file else ""
    except OSError:
        token = ""
    if token:
        headers["Authorization"] = f"Bearer {token}"
    deadline = time.monotonic() + timeout
    seen = ""
    while True:
        try:
            try:
                with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=0.5) as resp:
                    body = resp.read()
            except urllib.error.HTTPError as e:  # 503 while down still carries the details
                body = e.read()
            seen = json.loads(body)["healthgate"]["admin"]
            if seen == action:
                return ""
        except urllib.error.URLError as e:
            if isinstance(e.reason, ConnectionRefusedError):
                return f"no agent answers at {url}; it will apply the state when it starts"
            seen = str(e.reason)
        except (OSError, ValueError, KeyError, TypeError) as e:
            seen = f"{type(e).__name__}: {e}"
        if time.monotonic() >= deadline:
            return (f"the agent at {url} still reports {seen or 'nothing'}; is it running with "
                    f"state_dir = {config.agent.state_dir}?")
        time.sleep(0.05)

"""Drain and maintenance: the state file written by the CLI and the admin endpoints, watched by the agent."""

from __future__ import annotations

import asyncio
import fcntl
import http.client
import json
import logging
import math
import os
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from agent import logs
from agent.config import Config
from agent.fields import YEAR, bounded_duration, format_duration, format_listen
from agent.model import Admin
from agent.probes.base import NAME_PATTERN
from agent.probes.blocking import StillBlocked, off_loop
from agent.state import AgentState
from agent.watch import DirWatch, file_dirs

STATE_FILE = "admin.json"
POLL = 0.5  # seconds between looks at the state file: one stat(), a read only when it changed
SAFETY_POLL = 10.0  # the same while inotify watches the state directory: changes wake the watcher at once
READ_TIMEOUT = 1.0  # a state directory that hangs (dead network mount) is given up on for this round
REASON_MAX = 200
MAX_FOR = YEAR  # the longest --for / ?for=: further out is a typo, not a plan
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
    # The verdict groups' own drain/maint (`--group`), by name; each entry's `groups` is empty. Written in
    # the same file as the node's record, so one atomic rename changes both and nothing can tear them apart.
    groups: tuple[tuple[str, AdminRecord], ...] = ()

    def expired(self, wall: float) -> bool:
        return self.until is not None and wall >= self.until

    def group(self, name: str) -> AdminRecord:
        return next((r for g, r in self.groups if g == name), READY)

    def with_group(self, name: str, record: AdminRecord, wall: float) -> AdminRecord:
        """This record with `name` set to `record` (ready removes it), and expired group entries dropped."""
        kept = {g: r for g, r in self.groups if g != name and not r.expired(wall)}
        if record.admin is not Admin.READY:
            kept[name] = record
        return replace(self, groups=tuple(sorted(kept.items())))


READY = AdminRecord(Admin.READY)
_UNSEEN = object()


def state_path(state_dir: str | os.PathLike[str]) -> Path:
    return Path(state_dir) / STATE_FILE


def make_record(admin: Admin, reason: str = "", duration: float | None = None, source: str = "",
                wall: float | None = None) -> AdminRecord:
    wall = time.time() if wall is None else wall
    until = wall + duration if duration else None
    return AdminRecord(admin, sanitize(reason), until, wall, source)


def _fields(record: AdminRecord) -> dict:
    return {"admin": record.admin.value, "reason": record.reason, "until": record.until, "set_at": record.set_at,
            "source": record.source}


def encode(record: AdminRecord) -> bytes:
    data = _fields(record)
    if record.groups:  # absent without group states: the file stays what older agents wrote and read
        data["groups"] = {name: _fields(r) for name, r in record.groups}
    return (json.dumps(data, indent=2) + "\n").encode()


def _usable_time(wall: float) -> bool:
    if not (math.isfinite(wall) and wall >= 0):
        return False
    try:
        time.gmtime(wall)
    except (OverflowError, OSError, ValueError):
        return False
    return True


def decode(raw: bytes) -> AdminRecord:
    """The record in a state file; ValueError for anything that isn't one we wrote."""
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"not JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    record = _entry(data, "")
    groups = data.get("groups", {})  # files written before verdict groups have none
    if not isinstance(groups, dict):
        raise ValueError("groups: not a JSON object")
    entries = []
    for name, entry in sorted(groups.items()):
        if not re.fullmatch(NAME_PATTERN, name):
            raise ValueError(f"groups: {sanitize(name, 70)!r} is not a group name")
        if not isinstance(entry, dict):
            raise ValueError(f"groups.{name}: not a JSON object")
        entries.append((name, _entry(entry, f"groups.{name}.")))
    return replace(record, groups=tuple(entries))


def _entry(data: dict, where: str) -> AdminRecord:
    """One record (the node's, or a group's), its errors named by key path."""
    try:
        admin = Admin(data.get("admin"))
    except ValueError:
        raise ValueError(f"{where}admin: {data.get('admin')!r} is not one of ready, drain, maint") from None
    until, set_at = data.get("until"), data.get("set_at")
    for key, value in (("until", until), ("set_at", set_at)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise ValueError(f"{where}{key}: not a number")
        # NaN never expires, and 1e400 (JSON's infinity) or 1e300 is no date gmtime() can show: such a
        # file was not written by us, and like any corrupt file it means maintenance.
        if value is not None and not _usable_time(value):
            raise ValueError(f"{where}{key}: {value!r} is not a usable time")
    reason = data.get("reason", "")
    if not isinstance(reason, str):
        raise ValueError(f"{where}reason: not a string")
    return AdminRecord(admin, sanitize(reason), None if until is None else float(until),
                       None if set_at is None else float(set_at), sanitize(str(data.get("source", "")), 20))


class AdminWriteError(Exception):
    """The state file could not be written; the message names the file and the system's reason."""


def write_record(state_dir: str | os.PathLike[str], record: AdminRecord) -> Path:  # pragma: no mutate block
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


LOCK_FILE = ".admin.lock"


def update_record(state_dir: str | os.PathLike[str],
                  change: Callable[[AdminRecord], AdminRecord]) -> tuple[Path, AdminRecord]:  # pragma: no mutate block
    """Read the state file, change its record and write it back, under a lock on the state directory, so
    that a node command and a group command (or two group commands) at the same moment both count.

    `change` may raise AdminWriteError to refuse; nothing is written then.
    """
    directory = Path(state_dir)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise AdminWriteError(f"cannot write {state_path(directory)}: {e.strerror or e}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        record = change(read_record(state_path(directory)))
        return write_record(directory, record), record
    finally:
        os.close(fd)  # releases the lock


def keeping_groups(record: AdminRecord) -> Callable[[AdminRecord], AdminRecord]:
    """A node command's change: the node's record replaced, the groups' states kept (those still in force)."""
    def change(current: AdminRecord) -> AdminRecord:
        wall = record.set_at or time.time()
        groups = () if current.source == "agent" else current.groups  # an unusable file had none we can trust
        return replace(record, groups=tuple((g, r) for g, r in groups if not r.expired(wall)))

    return change


def setting_group(group: str, record: AdminRecord) -> Callable[[AdminRecord], AdminRecord]:
    """A `--group` command's change: that group's entry replaced, the node's record as it is."""
    def change(current: AdminRecord) -> AdminRecord:
        if current.source == "agent":  # never write the agent's made-up maintenance back as an operator's
            raise AdminWriteError(f"{current.reason}; run `healthgate ready` (or maint) for the node first, "
                                  "which rewrites it")
        return current.with_group(group, replace(record, groups=()), record.set_at or time.time())

    return change


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

    Invariant: only this object calls `state.set_admin`, from the event loop. File reads and writes run
    in threads of their own (off_loop), one read and one write at a time, never in the loop's default
    executor: that one is where drivers resolve host names, and a hung resolver fills it. So neither a
    hung state directory nor a hung resolver stalls the loop, and maintenance takes effect within a poll
    whatever the probes do; a stuck state directory costs this watcher READ_TIMEOUT per round at most.
    """

    def __init__(self, state: AgentState):  # pragma: no mutate block
        self.state = state
        self.record: AdminRecord = READY
        self._sig: object = _UNSEEN  # what the file looked like at the last read whose result was taken
        self._slots: dict[str, object] = {}  # off_loop's: the read and the write in flight
        self._lock = asyncio.Lock()
        self._read_once = False
        self._due = asyncio.Event()  # set by beat() when the next look is due, and by inotify on a change
        self._next_look = 0.0
        self._expires: float | None = None  # the wall time the next `--for` runs out
        self._watch: DirWatch | None = None  # made in run(): it needs the running loop
        self._looked_with: Config | None = None  # the config of the last look: a reload may move the file

    @property
    def path(self) -> Path:  # pragma: no mutate block
        return state_path(self.state.config.agent.state_dir)

    @staticmethod
    def _signature(path: Path) -> tuple:  # pragma: no mutate block
        try:
            st = path.stat()
        except (FileNotFoundError, NotADirectoryError):
            return ("absent", path)
        except OSError as e:
            return ("error", path, e.errno)
        return ("file", path, st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size)

    def poll(self, force: bool = False) -> tuple[tuple, AdminRecord | None]:  # pragma: no mutate block
        """Blocking: (what the file looks like, its record if it changed since the last look or `force`).

        A rename gives the file a new inode and mtime, so one cheap stat() tells a change. The look is
        remembered by the caller only when it takes the result: a read that outlived its round and was
        given up on must not make the next round believe the file was seen.
        """
        self._looked_with = self.state.config
        path = self.path
        if self._watch is not None:  # first, so that a change after this look is sure to wake us
            self._watch.arm(file_dirs(str(path)))
        sig = self._signature(path)
        if not force and sig == self._sig and sig[0] != "error":
            return sig, None
        return sig, read_record(path)

    async def sync(self, force: bool = False) -> bool:  # pragma: no mutate block
        """Pick up the file now; False when a read is stuck in its thread (the next round catches up).

        Called at startup before anything serves, so maintenance survives a restart; a state directory
        that doesn't answer then means maintenance until it does (fail closed)."""
        async with self._lock:
            force = force or self.record.source == "agent"  # a made-up record is re-checked every round
            try:
                async with asyncio.timeout(READ_TIMEOUT):
                    sig, record = await off_loop(self._slots, "read", self.poll, force, name="admin-read")
            except StillBlocked:
                return False
            except TimeoutError:
                logs.event("admin_state_slow", logging.WARNING, path=str(self.path),
                           detail=f"reading the state file took over {READ_TIMEOUT:g}s")
                if not self._read_once:  # at startup: we can't tell whether maint was asked for
                    self._take(AdminRecord(Admin.MAINT, f"state file {self.path} not readable within "
                                                        f"{READ_TIMEOUT:g}s", source="agent"))
                    self.apply(time.time())
                return False
            self._read_once = True
            self._sig = sig
            if record is not None:
                self._take(record)
            self.apply(time.time())
            return True

    async def write(self, record: AdminRecord, group: str | None = None) -> Path:  # pragma: no mutate block
        """Write the state file off the loop (the admin endpoints), for the node or one verdict group (the
        node's record, or the groups', kept as they are), then pick it up at once.

        AdminWriteError when it can't be written or the previous write is still stuck. The caller bounds
        the wait (asyncio.timeout): a write given up on may still land, and its thread stays the only one.
        """
        state_dir = self.state.config.agent.state_dir
        try:
            change = keeping_groups(record) if group is None else setting_group(group, record)
            path, _ = await off_loop(self._slots, "write", update_record, state_dir, change, name="admin-write")
        except StillBlocked as e:
            raise AdminWriteError(f"cannot write {state_path(state_dir)}: the write started {e.stuck:.0f}s ago "
                                  "is still blocked") from None
        await self.sync()
        return path

    async def carry_over(self, state_dir: str) -> str | None:  # pragma: no mutate block
        """Before a reload moves `state_dir`: keep the drain or maintenance in force; None when the reload
        may go on, else why it must be refused.

        Moving the directory must never lift an operator's state. With nothing in force there is nothing
        to keep: the new directory's file applies. Otherwise the record in force is written into the new
        directory, unless a state file is there already: one that agrees is kept as it is, one that says
        something else is a conflict only an operator can settle.
        """
        new, old = state_path(state_dir), self.path
        if new == old or self.state.admin is Admin.READY:
            return None
        async with self._lock:
            record, mode = self.record, self.state.admin.value
            try:
                async with asyncio.timeout(READ_TIMEOUT):
                    there = await off_loop(self._slots, "move-read", read_record, new, name="admin-read")
                    if there == READY:  # no file: take the state along
                        await off_loop(self._slots, "move-write", write_record, state_dir, record,
                                       name="admin-write")
                        logs.event("admin_state_carried", admin=mode, source=str(old), to=str(new))
                        return None
            except TimeoutError:
                return f"agent.state_dir: {state_dir} did not answer within {READ_TIMEOUT:g}s; {self._keep(mode)}"
            except StillBlocked:
                return f"agent.state_dir: an earlier look at {state_dir} is still blocked; {self._keep(mode)}"
            except AdminWriteError as e:
                return f"agent.state_dir: {e}; {self._keep(mode)}"
            if there.admin is self.state.admin and there.source != "agent":
                return None
            return (f"agent.state_dir: {new} says {there.admin.value} ({there.reason or 'no reason'}) but the node "
                    f"is in {mode} from {old}; {self._keep(mode)}: make the two agree (run `healthgate {mode}` "
                    f"with the new config) or remove {new}, then reload")

    @staticmethod
    def _keep(mode: str) -> str:  # pragma: no mutate block
        return f"the reload is refused so that {mode} is not lost"

    def _take(self, record: AdminRecord) -> None:  # pragma: no mutate block
        if record == self.record:
            return
        if record.source == "agent":
            logs.event("admin_state_unusable", logging.ERROR, path=str(self.path), reason=record.reason,
                       detail="in maintenance until the file is fixed or `healthgate ready` rewrites it")
        else:
            until = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.until)) if record.until else None
            logs.event("admin_state_read", path=str(self.path), admin=record.admin.value, reason=record.reason,
                       until=until, source=record.source,
                       **({"groups": {g: r.admin.value for g, r in record.groups}} if record.groups else {}))
        self.record = record

    def apply(self, wall: float) -> None:
        """Put the record in force, the node's and each group's, or ready once its `--for` has run out."""
        self._apply_node(wall)
        self.state.set_group_admin({g: (r.admin, r.reason, r.until) for g, r in self.record.groups
                                    if r.admin is not Admin.READY and not r.expired(wall)})
        self._expires = min((r.until for r in (self.record, *(g for _, g in self.record.groups))
                             if r.admin is not Admin.READY and r.until and r.until > wall), default=None)

    def _apply_node(self, wall: float) -> None:
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

    def beat(self, now: float) -> None:  # pragma: no mutate block
        """Called by the heartbeat: a look every POLL seconds rides on a wake-up the loop has anyway, instead
        of a timer of its own waking it twice a second more. While inotify watches the directory a change
        wakes the watcher itself and the look is a safety net every SAFETY_POLL; a made-up record (an
        unreadable file) is looked at every POLL whatever, and a `--for` running out is applied on time."""
        watched = self._watch is not None and self._watch.armed and self.record.source != "agent"
        if (self._expires is not None and time.time() >= self._expires) or self.state.config is not self._looked_with:
            self._next_look = now
        elif not watched:  # the watch lost since the last look (its directory removed): the fast poll again
            self._next_look = min(self._next_look, now + POLL)
        if now >= self._next_look:
            self._next_look = now + (SAFETY_POLL if watched else POLL)
            self._due.set()

    async def run(self, paced: bool = False) -> None:  # pragma: no mutate block
        """Look at the file every POLL seconds: on its own timer, or when `paced`, as beat() says; and
        whenever inotify says it changed."""
        if self._watch is None:
            self._watch = DirWatch(self._due.set)
        try:
            await self._run(paced)
        finally:
            self._watch.close()
            self._watch = None

    async def _run(self, paced: bool) -> None:  # pragma: no mutate block
        while True:
            try:
                await self.sync()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # one bad round must not end the watcher; the last state stays
                logs.event("admin_watch_error", logging.ERROR, error=repr(e))
            if paced:
                await self._due.wait()
                self._due.clear()
            else:
                try:
                    async with asyncio.timeout(POLL):
                        await self._due.wait()
                except TimeoutError:
                    pass
                self._due.clear()


# -- the `healthgate drain | maint | ready` commands --------------------------------------------------

def who() -> str:  # pragma: no mutate block
    try:
        import pwd

        return pwd.getpwuid(os.geteuid()).pw_name
    except (ImportError, KeyError):
        return f"uid {os.geteuid()}"


def parse_for(text: str) -> float:
    """Seconds of a --for or ?for= duration: more than 0 and at most MAX_FOR; ValueError in the user's words."""
    seconds = bounded_duration(text, MAX_FOR)
    if seconds <= 0:
        raise ValueError("must be a positive duration such as 10m")
    return seconds


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
    import urllib.error
    import urllib.request

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
    from agent.cli.remote import admin_socket, unix_request

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
                request = urllib.request.Request(url, headers=headers)
                try:
                    with urllib.request.urlopen(request, timeout=0.5) as resp:
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

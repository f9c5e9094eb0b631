"""Drain and maintenance: the state file's record, its format and its atomic writes (CLI and admin endpoints)."""

from __future__ import annotations

import fcntl
import json
import math
import os
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from agent.fields import YEAR, bounded_duration
from agent.model import Admin
from agent.probes.base import NAME_PATTERN

STATE_FILE = "admin.json"
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


def state_path(state_dir: str | os.PathLike[str]) -> Path:
    return Path(state_dir) / STATE_FILE


def make_record(admin: Admin, reason: str = "", duration: float | None = None, source: str = "",
                wall: float | None = None) -> AdminRecord:
    wall = time.time() if wall is None else wall
    until = wall + duration if duration else None
    return AdminRecord(admin, sanitize(reason), until, wall, source)


def parse_for(text: str) -> float:
    """Seconds of a --for or ?for= duration: more than 0 and at most MAX_FOR; ValueError in the user's words."""
    seconds = bounded_duration(text, MAX_FOR)
    if seconds <= 0:
        raise ValueError("must be a positive duration such as 10m")
    return seconds


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
        admin = Admin(str(data.get("admin")))
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

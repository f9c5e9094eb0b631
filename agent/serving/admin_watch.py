"""The agent's side of drain and maintenance: the operator's state file watched into the state."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from agent import logs
from agent.admin import (
    READY,
    AdminRecord,
    AdminWriteError,
    keeping_groups,
    read_record,
    setting_group,
    state_path,
    update_record,
    write_record,
)
from agent.config import Config
from agent.fields import format_duration
from agent.model import Admin
from agent.probes.blocking import StillBlocked, off_loop
from agent.state import AgentState
from agent.watch import DirWatch, file_dirs

POLL = 0.5  # seconds between looks at the state file: one stat(), a read only when it changed
SAFETY_POLL = 10.0  # the same while inotify watches the state directory: changes wake the watcher at once
READ_TIMEOUT = 1.0  # a state directory that hangs (dead network mount) is given up on for this round
_UNSEEN = object()


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
                spent = format_duration(round(r.until - r.set_at, 3)) if r.set_at and r.until else "its time"
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

"""Change notification for the files the agent watches (its config, the admin state file), from inotify.

An idle agent should look at a file when it changes, not stat() it on a timer: each timed look is a
wake-up of the loop and a hand-off to a thread, and they were most of the agent's idle CPU. inotify tells
the loop through one file descriptor when anything happens in a watched directory: a file written, one
renamed into place (how `healthgate drain` and editors write), removed, or a ConfigMap volume's `..data`
symlink swapped.

Only an optimisation of the poll, never a replacement: whoever uses a DirWatch keeps a poll, fast while
`armed` is false and slow (a safety net) while it is true. `armed` is false when inotify cannot be had
(no libc symbol, a full table of inotify instances or watches, `HEALTHGATE_INOTIFY=0`), when a watched
directory does not exist, and from the moment one is removed or moved until it is watched again.

`arm()` resolves paths, so it may block on a hung mount: it is called from a thread (off_loop), and only
swaps the finished table of watches in at the end. Events are read on the loop (the descriptor is
non-blocking) and wake the caller through `changed()`, at most once per batch.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import os
import struct
from collections.abc import Callable, Mapping
from typing import Literal

IN_MODIFY, IN_ATTRIB, IN_CLOSE_WRITE = 0x2, 0x4, 0x8
IN_MOVED_FROM, IN_MOVED_TO, IN_CREATE, IN_DELETE = 0x40, 0x80, 0x100, 0x200
IN_DELETE_SELF, IN_MOVE_SELF, IN_Q_OVERFLOW, IN_IGNORED = 0x400, 0x800, 0x4000, 0x8000
IN_ONLYDIR, IN_NONBLOCK, IN_CLOEXEC = 0x1000000, os.O_NONBLOCK, os.O_CLOEXEC
MASK = (IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE
        | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR)
LOST = IN_DELETE_SELF | IN_MOVE_SELF | IN_IGNORED  # the directory itself is gone: its watch is over
_EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len; then len bytes of name

_libc: ctypes.CDLL | None | Literal[False] = None  # None: not tried yet; False: no inotify here


def _lib() -> ctypes.CDLL | None:
    global _libc
    if _libc is None:
        try:
            lib = ctypes.CDLL(None, use_errno=True)  # the C library the interpreter already uses
            lib.inotify_init1.argtypes = [ctypes.c_int]
            lib.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
            lib.inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]
            _libc = lib
        except (OSError, AttributeError):
            _libc = False
    return _libc or None


def enabled() -> bool:
    """False when the operator turned inotify off (`HEALTHGATE_INOTIFY=0`, for a filesystem whose changes
    send no events) or this system has none."""
    return os.environ.get("HEALTHGATE_INOTIFY", "1") != "0" and _lib() is not None


class DirWatch:
    """Calls `changed()` on the loop when one of the named files in a watched directory changes, or a
    watched directory goes away. Idle until `arm()`; `close()` ends it."""

    def __init__(self, changed: Callable[[], None]):
        self.changed = changed
        self.armed = False
        self._fd = -1
        self._want: dict[str, frozenset[str]] = {}  # directory -> names in it, as last asked for
        self._wds: dict[int, frozenset[str]] = {}  # watch descriptor -> names; swapped whole by arm()
        self._loop = asyncio.get_running_loop()
        lib = _lib() if enabled() else None
        if lib is None:
            return
        fd = lib.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:  # EMFILE: fs.inotify.max_user_instances is used up by other programs; poll instead
            return
        self._fd = fd
        self._loop.add_reader(fd, self._read)

    def arm(self, dirs: Mapping[str, frozenset[str]]) -> bool:
        """Blocking (it resolves paths): watch exactly `dirs` ({directory: names of files in it}); True
        when every one is watched. Each path is looked up again every time, even when `dirs` is what it
        was: a symlink on the way may now lead to another directory (inotify gives the same descriptor
        back for a directory watched already, so this costs one lookup per directory)."""
        lib = _lib()
        if self._fd < 0 or lib is None:
            return False
        dirs = {d: frozenset(n) for d, n in dirs.items()}
        wds: dict[int, frozenset[str]] = {}
        ok = True
        for directory, names in dirs.items():
            wd = lib.inotify_add_watch(self._fd, os.fsencode(directory), MASK)
            if wd < 0:  # ENOENT, ENOTDIR, EACCES, ENOSPC (max_user_watches): the poll covers it
                ok = False
                continue
            wds[wd] = wds.get(wd, frozenset()) | names  # two paths may name one directory
        for wd in set(self._wds) - set(wds):
            lib.inotify_rm_watch(self._fd, wd)  # EINVAL for one the kernel already dropped: nothing to do
        self._wds, self._want = wds, dirs
        self.armed = ok and bool(wds)
        return self.armed

    def _read(self) -> None:
        relevant = False
        while True:
            try:
                data = os.read(self._fd, 65536)
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno == errno.EINTR:
                    continue
                self.armed = False
                relevant = True
                break
            if not data:
                break
            offset = 0
            while offset + _EVENT.size <= len(data):
                wd, mask, _, size = _EVENT.unpack_from(data, offset)
                name = data[offset + _EVENT.size:offset + _EVENT.size + size].rstrip(b"\0")
                offset += _EVENT.size + size
                if mask & (LOST | IN_Q_OVERFLOW):
                    if mask & LOST:
                        self.armed = False  # until arm() watches the directory (or its successor) again
                    relevant = True
                    continue
                names = self._wds.get(wd)
                if names is None or os.fsdecode(name) in names:  # an unknown wd: arm() raced us; look
                    relevant = True
        if relevant:
            self.changed()

    def close(self) -> None:
        if self._fd >= 0:
            try:
                self._loop.remove_reader(self._fd)
            except RuntimeError:
                pass  # the loop is closed already
            os.close(self._fd)
            self._fd = -1
        self.armed = False
        self._wds = {}


def file_dirs(path: str) -> dict[str, frozenset[str]]:
    """Blocking: where a change to the file at `path` shows: its directory; that directory's parent, for
    the directory's own name (removed, made again, or a symlink to it swapped, as a deploy's `current`
    link is: the directory first watched then never changes); and the directory of the file a symlink
    leads to."""
    here = os.path.abspath(path)
    dirs: dict[str, frozenset[str]] = {}

    def add(d: str, name: str) -> None:
        dirs[d] = dirs.get(d, frozenset()) | {name}

    parent = os.path.dirname(here)
    add(parent, os.path.basename(here))
    if os.path.dirname(parent) != parent:
        add(os.path.dirname(parent), os.path.basename(parent))
    real = os.path.realpath(here)
    if real != here:
        add(os.path.dirname(real), os.path.basename(real))
    return dirs


def config_dirs(path: str) -> dict[str, frozenset[str]]:
    """Blocking: file_dirs() of the config file, and its directory's `..data` (a ConfigMap volume's swap)."""
    dirs = file_dirs(path)
    here = os.path.dirname(os.path.abspath(path))
    dirs[here] = dirs[here] | {"..data"}
    return dirs

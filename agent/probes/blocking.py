"""Blocking calls (statvfs, /proc and state-file reads, NSS lookups) off the event loop, at most one per slot."""

from __future__ import annotations

import asyncio
import os
import queue
import threading
import time
from collections.abc import Callable, MutableMapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from agent.probes.base import CheckFailed, Context

T = TypeVar("T")


class StillBlocked(Exception):
    """The previous call in this slot has not returned yet; `stuck` is for how many seconds."""

    def __init__(self, stuck: float):
        super().__init__(f"the call started {stuck:.0f}s ago is still blocked")
        self.stuck = stuck


IDLE_EXIT = 30.0  # seconds a slot's thread waits for its next call before it ends


class _Worker:
    """A slot's own daemon thread, kept between calls: starting a thread per call (twice a second for the
    state file, once per sample of every system check) cost more than the calls themselves. It ends after
    IDLE_EXIT seconds without work, and the slot starts a new one on its next call."""

    def __init__(self, name: str):
        self.jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self.lock = threading.Lock()  # orders "idle, so exit" against a new job
        self.alive = True
        threading.Thread(target=self._run, name=name, daemon=True).start()

    def submit(self, job: Callable[[], None]) -> bool:
        """Queue `job`; False when the thread has ended (the caller starts another)."""
        with self.lock:
            if not self.alive:
                return False
            self.jobs.put(job)
            return True

    def _run(self) -> None:
        while True:
            try:
                job = self.jobs.get(timeout=IDLE_EXIT)
            except queue.Empty:
                with self.lock:
                    if self.jobs.empty():
                        self.alive = False
                        return
                continue
            job()


async def off_loop(slots: MutableMapping[Any, Any], slot: object, fn: Callable[..., T], *args: Any,
                   name: str = "healthgate") -> T:
    """Run fn(*args) in the slot's own daemon thread (called `name`) and await it; StillBlocked while the
    slot's last call still runs.

    A call that hangs in the kernel (statvfs on a dead NFS mount, a /proc/PID/cmdline read of a process
    stuck in mmap_sem, a config file on a stalled mount) cannot be interrupted: a timeout around the
    await cancels the wait, the thread stays. Two rules contain that. The thread is the slot's own, never
    one of the loop's shared executor, so a hung call cannot starve anyone else's threads (the executor is
    where drivers resolve host names, and a hung resolver fills it). And while a slot's previous call is
    still stuck, the next one fails at once instead of starting another: at most one stuck thread per slot.

    Every blocking call of the agent comes here (none uses asyncio.to_thread or the default executor); the
    bound stays the caller's `asyncio.timeout` around the await, not a parameter: what running out means
    differs (a round skipped, a reload refused, maintenance at startup) and one budget may cover two calls
    (the admin watcher's carry_over reads, then writes).
    """
    previous = slots.get(slot)
    if previous is not None and not previous[0].is_set():
        raise StillBlocked(time.monotonic() - previous[1])
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def settle(value: Any, error: BaseException | None) -> None:
        if done.cancelled():
            return
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(value)

    def work() -> None:
        try:
            value, error = fn(*args), None
        except BaseException as e:  # handed to the awaiting caller, which decides
            value, error = None, e
        finished.set()  # before waking the caller, whose next call checks it
        try:
            loop.call_soon_threadsafe(settle, value, error)
        except RuntimeError:
            pass  # the loop closed while we were blocked: nobody is waiting any more

    finished = threading.Event()
    worker = previous[2] if previous is not None else None
    if worker is None or not worker.submit(work):
        worker = _Worker(name)
        worker.submit(work)
    slots[slot] = (finished, time.monotonic(), worker)
    return await done


async def blocking(ctx: Context, check: str, label: str, fn: Callable[..., T], *args: Any,
                   busy: str | None = None) -> T:
    """A probe's off_loop: one slot per check, and a stuck previous call fails the sample as `hung`.

    `check` names the slot: a probe with two kinds of blocking call uses "name/what" for the second.
    `label` leads the failure reason; `busy` replaces the default one given while the previous call is stuck.
    """
    try:
        return await off_loop(ctx.memo, ("blocking", check), fn, *args, name=f"probe:{check}")
    except StillBlocked as e:
        raise CheckFailed(busy or f"{label}: the read started {e.stuck:.0f}s ago is still blocked "
                          "(hung mount, stuck process or name service?)", "hung") from None


def _mounts() -> list[tuple[str, str]]:
    """(mount point, filesystem type) of every mount this process sees, from /proc/self/mountinfo."""
    out = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
        for line in f:
            fields, _, rest = line.partition(" - ")
            parts = fields.split()
            if len(parts) >= 5 and rest:
                point = parts[4].replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n")
                out.append((point.replace("\\134", "\\"), rest.split()[0]))
    return out


_PROCFS: dict[str, bool] = {}  # path -> served_by_procfs(path), decided once per path, in a check's thread
_PATHS: dict[tuple[Path, tuple[str, ...]], tuple[str, ...]] = {}  # (proc, files) -> their paths, joined once


def served_by_procfs(path: str) -> bool:
    """Blocking: whether the kernel's own procfs serves `path`: the mount that holds it,
    the longest mount point above it, is of type `proc`. Such a file is generated by the kernel on read
    and never waits for a disk, a network or another process, so it is read on the loop. A file that
    only looks like one is not: /proc/meminfo bind-mounted from lxcfs in a container (a FUSE server,
    which can hang), or the fixture files a test puts in place of /proc."""
    try:
        real = os.path.realpath(path)
        mounts = _mounts()
    except OSError:
        return False
    best, kind = "", ""
    for point, fstype in mounts:
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, fstype
    return kind == "proc"


async def kernel_read(ctx: Context, check: str, label: str, files: tuple[str, ...], fn: Callable[..., T],
                      *args: Any) -> T:
    """blocking() for a read of system-wide files under ctx.proc (meminfo, loadavg, stat, pressure/*):
    on the loop when procfs serves every one of them, which costs an idle agent no thread hand-off (two
    wake-ups of the loop and one of a thread per sample); in the check's thread otherwise. Never for
    /proc/PID files: those can wait on the process (its mmap lock).

    The question itself is asked in the thread, with the first read: its realpath() stat()s the file, and
    a stat() of a FUSE file whose server hangs waits as long as a read of it would."""
    key = (ctx.proc, files)
    paths = _PATHS.get(key)
    if paths is None:
        paths = _PATHS[key] = tuple(str(Path(ctx.proc, name)) for name in files)
    if all(_PROCFS.get(p) for p in paths):
        return fn(*args)

    def decide_then_read() -> T:
        for p in paths:
            if p not in _PROCFS:
                _PROCFS[p] = served_by_procfs(p)
        return fn(*args)

    return await blocking(ctx, check, label, decide_then_read)


class LookupPool(ThreadPoolExecutor):
    """The loop's default executor, where drivers resolve host names; counts the calls running in it.

    A worker stuck in getaddrinfo on a hung resolver stays stuck for the resolver's timeouts (timeout x
    attempts x servers: 30 s and more) and cannot be interrupted, so shutdown() never waits for one
    (queued calls are cancelled), and `running` tells the command line that the process should end
    without the interpreter's join of those threads.
    """

    def __init__(self, workers: int):
        super().__init__(max_workers=workers, thread_name_prefix="lookup")
        self._count_lock = threading.Lock()
        self.running = 0

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        def counted() -> T:
            with self._count_lock:
                self.running += 1
            try:
                return fn(*args, **kwargs)
            finally:
                with self._count_lock:
                    self.running -= 1

        return super().submit(counted)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        super().shutdown(wait=False, cancel_futures=True)

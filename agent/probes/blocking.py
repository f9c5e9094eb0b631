"""Blocking calls of probes (statvfs, /proc reads, NSS lookups) off the event loop, at most one per check."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from agent.probes.base import CheckFailed, Context

T = TypeVar("T")


async def blocking(ctx: Context, check: str, label: str, fn: Callable[..., T], *args: Any,
                   busy: str | None = None) -> T:
    """Run fn(*args) in its own daemon thread and await it; `label` leads the failure reason.

    `check` names the slot: a probe with two kinds of blocking call uses "name/what" for the second.
    `busy` replaces the default reason given while the previous call is still stuck.

    A call that hangs in the kernel (statvfs on a dead NFS mount, a /proc/PID/cmdline read of a process
    stuck in mmap_sem) cannot be interrupted: the runner's timeout cancels the await, the thread stays.
    Two rules contain that. The thread is our own, never one of the loop's shared executor, so a hung
    call cannot starve the other checks' threads. And while one check's previous call is still stuck,
    that check fails at once instead of starting another: at most one stuck thread per check.
    """
    slot = ("blocking", check)
    previous = ctx.memo.get(slot)
    if previous is not None and not previous[0].is_set():
        stuck = time.monotonic() - previous[1]
        raise CheckFailed(busy or f"{label}: the read started {stuck:.0f}s ago is still blocked "
                          "(hung mount, stuck process or name service?)", "hung")
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
        except BaseException as e:  # handed to the awaiting probe, which decides
            value, error = None, e
        finished.set()  # before waking the probe, whose next sample checks it
        try:
            loop.call_soon_threadsafe(settle, value, error)
        except RuntimeError:
            pass  # the loop closed while we were blocked: nobody is waiting any more

    finished = threading.Event()
    ctx.memo[slot] = (finished, time.monotonic())
    threading.Thread(target=work, name=f"probe:{check}", daemon=True).start()
    return await done

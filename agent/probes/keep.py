"""The connection a passing sample leaves open, so that a dependency dropping it is re-checked at once.

A sample still opens a fresh connection (one honest attempt: connect, authenticate, ask) and, when it
passes, hands that connection here instead of closing it; the check's next sample closes it first. While
it is held nothing is sent on it: its one use is the kernel's word that the other end has gone. A server
that is killed, crashes or restarts closes it at once (a FIN or a RST), and the scheduler then samples the
check now instead of up to an interval later, so a crash is confirmed in the fast re-checks' time
(`fall` - 1 of them) rather than in the rest of the interval plus that.

The cost is one idle connection per check to its server (one of its client slots), and nothing periodic.
A held connection is never closed politely: it is aborted (the socket closed at once, no TLS close_notify
to wait for), before the next sample connects, so a frozen server cannot hold a sample or the agent's
stop, and the sample never needs a second client slot beside it. At most a quarter of the open-file limit
(and MAX_HELD) are held at once, so they never crowd out the samples' own sockets.

A server that closes idle connections of its own accord (a Redis `timeout` shorter than the check's
interval) would turn every interval into two samples: so the first time the sample right after a drop
passes, the check stops holding connections, until its config changes, and says so once in the log. A
drop that a failing sample follows (a real outage, a restart) keeps it holding.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import resource
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from agent import logs

MAX_HELD = 256
CLOSE_WAIT = 1.0  # seconds the agent's stop waits for the client libraries' bookkeeping of aborted connections


def hold_limit() -> int:
    """How many connections may be held at once: a quarter of the open-file limit, at most MAX_HELD."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return MAX_HELD if soft == resource.RLIM_INFINITY else max(0, min(MAX_HELD, soft // 4))


@dataclass
class _Held:
    watch: asyncio.Future[Any]  # completes when the server drops (or, against the protocol, writes to) it
    abort: Callable[[], None]  # closes the socket now
    close: Callable[[], Awaitable[None]]  # the client library's own bookkeeping, after the abort


def _detached(coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
    """A task of the keeper's own: created in an empty context, so the runner's task factory, which reads
    the creating context, does not count it among the tasks the sample left behind."""
    return contextvars.Context().run(asyncio.get_running_loop().create_task, coro)


class Keeper:
    """The held connection of each check, and what its drops mean. `on_drop(name)` (the scheduler's) is
    called when a held connection is dropped by its server; only the check's own samples call the rest.

    Each sample's release() returns a token that its keep() must present: a sample overtaken by a newer one
    (a reload's first samples beside the running loop), by forget() (its check removed or changed) or by
    close() (the agent stopping) cannot leave a connection held behind them."""

    def __init__(self) -> None:
        self.on_drop: Callable[[str], None] | None = None
        self._held: dict[str, _Held] = {}
        self._token: dict[str, int] = {}  # the newest release() of each check
        self._tokens = 0
        self._dropped: set[str] = set()  # dropped since the check's last sample began
        self._rechecking: set[str] = set()  # the sample running now is the re-check of a drop
        self._off: set[str] = set()  # their servers close idle connections: none held, until a reload
        self._closing: set[asyncio.Task[Any]] = set()
        self._closed = False
        self.limit = hold_limit()
        self._full_said = False

    def holds(self, name: str) -> bool:
        return name in self._held

    async def release(self, name: str) -> int:
        """A sample of `name` begins: abort what the last one left open, and note whether this sample is a
        drop's re-check (if it passes, the drop was the server closing an idle connection). Returns the
        token the sample's keep() presents. Yields once, so the aborted socket is closed before the sample
        connects."""
        if name in self._dropped:
            self._dropped.discard(name)
            self._rechecking.add(name)
        else:
            self._rechecking.discard(name)  # the re-check did not pass: the drop was an outage
        token = self._next_token(name)
        if self._drop(name):
            await asyncio.sleep(0)  # the transport closes its socket on the loop's next turn
        return token

    def keep(self, name: str, token: int, watch: Callable[[], Awaitable[Any]], abort: Callable[[], None],
             close: Callable[[], Awaitable[None]]) -> bool:
        """Hold a passing sample's connection. `watch()` gives what completes when the server drops it,
        `abort()` closes its socket at once, `close()` then tidies the client library's side. False when
        this check holds none (the caller then closes it itself)."""
        if self._closed or self._token.get(name) != token:
            return False  # overtaken: a newer sample, a reload's forget() or the agent's stop came first
        if name in self._rechecking:
            self._rechecking.discard(name)
            self._off.add(name)
            logs.event("connection_hold_off", logging.INFO, check=name,
                       why="its server closed an idle connection and the check passed right after: no more "
                           "connections are held for it (a crash is then seen at the next sample)")
            return False
        if name in self._off:
            return False
        if len(self._held) >= self.limit:
            if not self._full_said:
                self._full_said = True
                logs.event("connection_hold_limit", logging.INFO, limit=self.limit,
                           why="more checks than connections that may be held: the others see a crash at "
                               "their next sample")
            return False
        held = _Held(_detached(_await(watch)), abort, close)
        self._held[name] = held
        held.watch.add_done_callback(lambda t: self._lost(name, held, t))
        return True

    def discard(self, name: str) -> None:
        """The check's sample failed after all (the runner's clock found it late): hold nothing for it."""
        self._drop(name)

    def forget(self, name: str) -> None:
        """The check was removed or changed by a reload: abort its connection and start afresh."""
        self._next_token(name)
        self._dropped.discard(name)
        self._rechecking.discard(name)
        self._off.discard(name)
        self._drop(name)

    async def close(self) -> None:
        """Abort every held connection (the agent stops); their libraries' bookkeeping gets CLOSE_WAIT."""
        self._closed = True
        for name in list(self._held):
            self._drop(name)
        if self._closing:
            await asyncio.wait(list(self._closing), timeout=CLOSE_WAIT)

    def _next_token(self, name: str) -> int:
        self._tokens += 1
        self._token[name] = self._tokens
        return self._tokens

    def _drop(self, name: str) -> bool:
        held = self._held.pop(name, None)
        if held is None:
            return False
        self._abort(held)
        return True

    def _lost(self, name: str, held: _Held, task: asyncio.Future[Any]) -> None:
        if not task.cancelled():
            task.exception()  # retrieved: a reset is as good as an end of file here
        if self._held.get(name) is not held:
            return  # released, replaced or forgotten first: our own close, not the server's
        del self._held[name]
        self._dropped.add(name)
        self._abort(held)
        if self.on_drop is not None:
            self.on_drop(name)

    def _abort(self, held: _Held) -> None:
        held.watch.cancel()
        try:
            held.abort()
        except Exception as e:  # noqa: BLE001 - a connection that fails to abort is closed enough
            logs.event("connection_abort_error", logging.DEBUG, error=repr(e))
        task = _detached(self._tidy(held))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    @staticmethod
    async def _tidy(held: _Held) -> None:
        try:
            async with asyncio.timeout(CLOSE_WAIT * 5):
                await held.close()
        except Exception as e:  # noqa: BLE001 - the socket is gone already; this is the library's bookkeeping
            logs.event("connection_close_error", logging.DEBUG, error=repr(e))


async def _await(watch: Callable[[], Awaitable[Any]]) -> Any:
    return await watch()  # made here, so a watch cancelled before it starts leaves no coroutine unawaited

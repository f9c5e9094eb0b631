"""sd_notify without libsystemd: READY, WATCHDOG, STOPPING and STATUS datagrams to $NOTIFY_SOCKET."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import MutableMapping

from agent import logs
from agent.serving.decision import Answer, describe


def socket_address(value: str | None) -> str | None:
    """$NOTIFY_SOCKET as an AF_UNIX address: an absolute path, or '@name' for the abstract namespace."""
    if not value:
        return None
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None  # vsock: and other transports are not supported; behave as if not under systemd


def watchdog_interval(env: MutableMapping[str, str]) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of $WATCHDOG_USEC, as sd_watchdog_enabled(3) advises).

    None when no watchdog is asked for, or when $WATCHDOG_PID names another process.
    """
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None
    return usec / 2_000_000


class Notifier:
    """Sends notifications to the service manager; does nothing when not started by one.

    Never raises and never blocks: a full or vanished socket drops the message (logged once),
    because the agent's verdict must not depend on systemd being there.
    """

    def __init__(self, address: str | None, watchdog: float | None = None):
        self.address = address
        self.watchdog = watchdog if address else None
        self._sock: socket.socket | None = None
        self._warned = False

    @classmethod
    def from_env(cls, env: MutableMapping[str, str] | None = None, unset: bool = True) -> Notifier:
        """Read $NOTIFY_SOCKET, $WATCHDOG_USEC and $WATCHDOG_PID; by default remove them so a check's
        subprocess cannot speak for the agent."""
        env = os.environ if env is None else env
        notifier = cls(socket_address(env.get("NOTIFY_SOCKET")), watchdog_interval(env))
        if unset:
            for key in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
                env.pop(key, None)
        return notifier

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *fields: str) -> bool:
        if self.address is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto("\n".join(fields).encode(), self.address)
            return True
        except OSError as e:
            if not self._warned:
                self._warned = True
                logs.event("sd_notify_failed", logging.WARNING, error=str(e), message=fields[0] if fields else "")
            return False

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class ServiceManager:
    """What the agent tells systemd, driven by the scheduler's heartbeat.

    READY=1 once every check has reported (the first verdict exists); WATCHDOG=1 only from a
    heartbeat that found the loop healthy, so a stalled agent stops pinging and systemd restarts
    it; STATUS= whenever the served verdict changes; STOPPING=1 when the drain starts.
    """

    def __init__(self, notifier: Notifier):
        self.notifier = notifier
        self.ready_sent = False
        self._next_ping = float("-inf")
        self._status: str | None = None

    def beat(self, now: float, answer: Answer, ready: bool) -> None:
        if not self.notifier.enabled:
            return
        fields = []
        if ready and not self.ready_sent:
            self.ready_sent = True
            fields.append("READY=1")
        text = describe(answer)
        if ready and text != self._status:
            self._status = text
            fields.append(f"STATUS={text}")
        interval = self.notifier.watchdog
        if interval is not None and answer.live and now >= self._next_ping:
            self._next_ping = now + interval
            fields.append("WATCHDOG=1")
        if fields:
            self.notifier.send(*fields)

    def stopping(self, drain: float) -> None:
        self.notifier.send("STOPPING=1", f"STATUS=draining for {drain:g}s, serving down")

    def close(self) -> None:
        self.notifier.close()


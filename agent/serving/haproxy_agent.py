"""HAProxy agent-check: format_reply(answer, weight) -> str (pure) and the asyncio TCP server."""

from __future__ import annotations

import asyncio
import functools
import logging

from agent import logs
from agent.access import admitted
from agent.admin import sanitize
from agent.serving.decision import Answer, agent_check_reason, agent_check_words, unknown_group
from agent.serving.listener import listen_tcp
from agent.serving.weight import WeightTracker
from agent.state import AgentState
from agent.text import mask

REASON_MAX = 120  # HAProxy shows the text after '#' in its stats and logs; keep it short
READ_WAIT = 0.1  # after replying, how long we read what HAProxy sent before closing
READ_CAP = 4096  # bytes of agent-send we are willing to read per connection
CONN_DEADLINE = 1.0  # no connection lives longer than this, whatever the client does
SEND_WAIT = 0.2  # with verdict groups: how long to wait for agent-send to name one


def format_reply(answer: Answer, weight: int | None, secrets: tuple[str, ...] = (), reasons: bool = True) -> str:
    """One line in HAProxy's agent-check grammar carrying the FULL state: health word, admin word, weight.

    HAProxy keeps whatever a reply leaves out (a bare `up` does not clear DRAIN or MAINT, and an
    empty or unknown reply changes nothing), so every reply says all three. The weight is sent only
    when up. The description after ` #` is one sanitised line: the admin reason, then why down, with
    `secrets` masked first (sanitising turns non-ASCII into `?`); none at all when `reasons` is false.
    """
    words = list(agent_check_words(answer))
    if answer.healthy:
        words.append(f"{max(1, min(100, weight if weight is not None else 100))}%")
    text = sanitize(mask(agent_check_reason(answer), secrets), REASON_MAX) if reasons else ""
    return " ".join(words) + (f" #{text}" if text else "") + "\n"


class AgentCheckServer:
    """Answers each connection with one line and closes it. Reads only the snapshot and a precomputed
    weight: an agent-check never runs a probe and never reads a file.

    Containment: at most `max_connections` at once (more are closed unanswered: HAProxy then keeps
    its last state and its httpchk still decides), and none lives past CONN_DEADLINE.
    """

    def __init__(self, state: AgentState, weights: WeightTracker):
        self.state = state
        self.weights = weights
        self.active = 0
        self.refused = 0  # connections closed unanswered because of the cap
        self.denied = 0  # connections closed unanswered because they came from outside allow_from
        self._server: asyncio.Server | None = None

    def reply(self, group: str | None = None) -> str:
        """The reply for the node, or for the verdict group HAProxy named with agent-send."""
        now = asyncio.get_running_loop().time()
        # Observed here too, not only on the tracker's tick: a drain or maintenance a reply has shown always
        # restarts the ramp when it ends, however soon after the tracker's last look it came and went.
        self.weights.observe(now)
        config = self.state.config
        if group is not None and group not in self.state.snapshot.groups:
            return format_reply(unknown_group(group), None, config.secrets(), config.agent_check.send_reasons)
        answer = self.state.answer(now, group)
        return format_reply(answer, self.weights.weight(now) if answer.healthy else None, config.secrets(),
                            config.agent_check.send_reasons)

    async def start(self, host: str, port: int) -> tuple[str, int]:
        self._server = await listen_tcp(functools.partial(asyncio.start_server, self._handle), host, port,
                                        backlog=256)
        return self._server.sockets[0].getsockname()[:2]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            try:
                async with asyncio.timeout(CONN_DEADLINE + 0.5):
                    await self._server.wait_closed()
            except TimeoutError:
                logs.event("agent_check_close_slow", logging.WARNING)
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not admitted(writer.transport, self.state.config.agent_check.allow_from):
            self.denied += 1  # closed without a word: the reply names the node's state and its reasons
            writer.transport.abort()
            return
        if self.active >= self.state.config.agent_check.max_connections:
            self.refused += 1
            writer.transport.abort()
            return
        self.active += 1
        try:
            async with asyncio.timeout(CONN_DEADLINE):
                # Without groups, reply first: what agent-send says doesn't change the answer, so nobody
                # waits for it. With groups, agent-send names the group; a connection that sends nothing
                # within SEND_WAIT gets the node's verdict.
                group = await self._group_named(reader) if self.state.snapshot.groups else None
                writer.write(self.reply(group).encode("ascii"))
                await writer.drain()
                await self._drain_input(reader)
        except (TimeoutError, OSError):
            pass
        finally:
            self.active -= 1
            writer.close()

    @staticmethod
    async def _group_named(reader: asyncio.StreamReader) -> str | None:
        """The group HAProxy named (`agent-send "api\\n"`): the first line, or what came within SEND_WAIT
        when no newline did (a name sent without one still names its group); None when nothing came."""
        got = b""
        try:
            async with asyncio.timeout(SEND_WAIT):
                while b"\n" not in got and len(got) < READ_CAP:
                    chunk = await reader.read(READ_CAP - len(got))
                    if not chunk:
                        break
                    got += chunk
        except TimeoutError:
            pass
        name = got.split(b"\n", 1)[0].decode("ascii", "replace").strip()
        return name or None

    @staticmethod
    async def _drain_input(reader: asyncio.StreamReader) -> None:
        """Read what HAProxy sent (agent-send) until it closes, briefly and boundedly. Closing with
        unread input would make the kernel answer with a RST, which can cost HAProxy the reply."""
        got = 0
        try:
            async with asyncio.timeout(READ_WAIT):
                while got < READ_CAP:
                    chunk = await reader.read(READ_CAP - got)
                    if not chunk:
                        return
                    got += len(chunk)
        except TimeoutError:
            pass

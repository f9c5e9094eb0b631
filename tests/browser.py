"""Headless Chromium driven over the DevTools Protocol (one websocket, flattened sessions), for page tests."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import signal
import tempfile
from pathlib import Path
from typing import Any

import aiohttp

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--remote-debugging-port=0", "--window-size=1280,900", "--hide-scrollbars")
LISTENING = re.compile(rb"DevTools listening on (ws://\S+)")


class CDPError(Exception):
    pass


class Browser:
    """One Chromium process and one page target; `send()` calls a method on that page.

    Every event is kept in `events` (method, params) so a test can inspect what the page did.
    """

    def __init__(self, binary: str):
        self.binary = binary
        self.proc: asyncio.subprocess.Process | None = None
        self.profile = tempfile.TemporaryDirectory(prefix="healthgate-chromium-", ignore_cleanup_errors=True)
        self.stderr: list[bytes] = []
        self.events: list[tuple[str, dict[str, Any]]] = []
        self._http: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._ids = 0
        self._pending: dict[int, asyncio.Future] = {}
        self._tasks: list[asyncio.Task] = []
        self.session: str | None = None

    async def start(self, timeout: float = 20.0) -> Browser:
        self.proc = await asyncio.create_subprocess_exec(
            self.binary, *FLAGS, f"--user-data-dir={self.profile.name}", "about:blank",
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
            start_new_session=True,  # its zygote and renderers share our process group: one kill ends them all
        )
        url = await asyncio.wait_for(self._devtools_url(), timeout)
        self._tasks.append(asyncio.create_task(self._drain_stderr()))
        self._http = aiohttp.ClientSession()
        self._ws = await self._http.ws_connect(url, max_msg_size=0)
        self._tasks.append(asyncio.create_task(self._read()))
        target = await self.call("Target.createTarget", url="about:blank")
        attached = await self.call("Target.attachToTarget", targetId=target["targetId"], flatten=True)
        self.session = attached["sessionId"]
        return self

    async def _devtools_url(self) -> str:
        assert self.proc is not None and self.proc.stderr is not None
        while True:
            line = await self.proc.stderr.readline()
            if not line:
                raise CDPError("chromium exited before DevTools listened: " + b"".join(self.stderr).decode())
            self.stderr.append(line)
            m = LISTENING.search(line)
            if m:
                return m.group(1).decode()

    async def _drain_stderr(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            self.stderr.append(line)

    async def _read(self) -> None:
        assert self._ws is not None
        async for msg in self._ws:
            if msg.type is not aiohttp.WSMsgType.TEXT:
                continue
            data = json.loads(msg.data)
            fut = self._pending.pop(data.get("id", -1), None)
            if fut is not None and not fut.done():
                if "error" in data:
                    fut.set_exception(CDPError(f"{data['error'].get('message')}: {data['error'].get('data', '')}"))
                else:
                    fut.set_result(data.get("result", {}))
            elif "method" in data:
                self.events.append((data["method"], data.get("params", {})))
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(CDPError("the DevTools connection closed"))

    async def call(self, method: str, session: str | None = None, timeout: float = 15.0, **params: Any) -> dict:
        """Call a method on the browser, or on a session."""
        assert self._ws is not None
        self._ids += 1
        msg: dict[str, Any] = {"id": self._ids, "method": method, "params": params}
        if session:
            msg["sessionId"] = session
        fut = asyncio.get_running_loop().create_future()
        self._pending[self._ids] = fut
        await self._ws.send_str(json.dumps(msg))
        return await asyncio.wait_for(fut, timeout)

    async def send(self, method: str, **params: Any) -> dict:
        """Call a method on the page."""
        return await self.call(method, self.session, **params)

    async def evaluate(self, expression: str) -> Any:
        """The JSON value of a JavaScript expression in the page."""
        out = await self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in out:
            raise CDPError(f"{expression}: {out['exceptionDetails']}")
        return out["result"].get("value")

    async def screenshot(self, path: Path) -> Path:
        shot = await self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        def write() -> None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(base64.b64decode(shot["data"]))

        await asyncio.to_thread(write)
        return path

    def requested_urls(self) -> list[str]:
        return [p["request"]["url"] for m, p in self.events if m == "Network.requestWillBeSent"]

    async def close(self) -> None:
        if self._ws is not None:
            with contextlib.suppress(Exception):
                await self.call("Browser.close", timeout=3)
            await self._ws.close()
        if self.proc is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.proc.wait(), 5)
            # The group is ours (start_new_session): this ends the browser and any helper it left behind.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            await self.proc.wait()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._http is not None:
            await self._http.close()
        self.profile.cleanup()

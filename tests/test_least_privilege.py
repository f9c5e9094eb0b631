"""Least privilege, least information: the admin socket, trusted networks, allow-lists, hostile text,
secrets in every output, and one trust rule for every command."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path

from tests.helpers import ROOT, AgentProcess, agent_toml, free_port, toml_table, wait_for


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=60, env={**os.environ, **(env or {})})


def down_check(port: int) -> str:
    return toml_table("[[checks]]", name="dep", type="tcp", port=port, interval="100ms", timeout="80ms",
                      rise=1, fall=1)


def test_loopback_is_untrusted_and_the_admin_socket_is_the_operators_channel(tmp_path: Path) -> None:
    """Over TCP loopback an untrusted client gets no reasons; the admin socket (mode 0660) serves status,
    explain, drain and ready to the CLI with every detail and no token."""
    sock = tmp_path / "hg.sock"
    config = agent_toml({"trusted_networks": [], "admin_socket": str(sock)},
                        state_dir=str(tmp_path / "state")) + down_check(free_port())
    agent = AgentProcess(tmp_path, config).start()
    try:
        wait_for(lambda: sock.exists(), what="the admin socket")
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o660 and stat.S_ISSOCK(os.stat(sock).st_mode)
        wait_for(lambda: agent.get("/health")[0] == 503, what="down")
        assert json.loads(agent.get("/status")[1]) == {"status": "fail"}
        assert "reason withheld" in agent.get("/health?verbose")[1]
        assert agent.get("/health/dep") == (503, "down\n")
        assert agent.get("/status/journal")[0] == 401 and agent.get("/")[0] == 401
        status = cli("status", "-c", str(agent.path), "--color", "never")
        assert status.returncode == 2 and "connection refused" in status.stdout, status.stderr
        explain = cli("explain", "-c", str(agent.path))
        assert explain.returncode == 2 and "dep (tcp)" in explain.stdout, explain.stderr
        drain = cli("drain", "-c", str(agent.path), "--reason", "deploy 42")
        assert drain.returncode == 0 and "applied by the agent" in drain.stdout, drain.stderr
        assert "set to DRAIN (deploy 42)" in cli("explain", "-c", str(agent.path)).stdout
        assert cli("ready", "-c", str(agent.path)).returncode == 0
        assert agent.get("/admin/drain")[0] == 404, "over TCP, no admin token: the paths do not exist"
    finally:
        agent.stop()


def test_a_stale_socket_file_is_replaced_and_trusted_networks_unlock_details(tmp_path: Path) -> None:
    """A socket file a killed agent left is replaced at the next start; a client from a trusted network
    (127.0.0.1/32 listed) sees reasons over TCP."""
    sock = tmp_path / "hg.sock"
    config = agent_toml({"admin_socket": str(sock)}) + down_check(free_port())
    first = AgentProcess(tmp_path, config).start()
    wait_for(lambda: sock.exists(), what="the admin socket")
    first.stop()  # SIGKILL: the file stays
    assert sock.exists()
    second = AgentProcess(tmp_path, config, port=first.port).start()
    try:
        wait_for(lambda: "tcp 127.0.0.1" in second.get("/health/dep")[1], what="reasons for a trusted network")
        assert cli("status", "-c", str(second.path), "-n", "0").returncode == 2
    finally:
        second.stop()


async def test_allow_lists_close_other_clients_without_a_reply(start_agent) -> None:
    """With allow_from naming only 127.0.0.1, a client from 127.0.0.2 (loopback too) is closed without a
    byte on the agent-check port and the HTTP port; 127.0.0.1 is answered. send_reasons = false sends
    HAProxy the state words only."""
    ac_port = free_port()
    agent = await start_agent({
        "server": {"allow_from": ["127.0.0.1/32"], "trusted_networks": []},
        "agent_check": {"listen": f"127.0.0.1:{ac_port}", "allow_from": ["127.0.0.1"], "send_reasons": False,
                        "weight_source": "off"},
        "checks": [{"name": "dep", "type": "tcp", "port": free_port(), "interval": "100ms", "timeout": "80ms",
                    "rise": 1, "fall": 1}]})
    http_port = agent.agent.address[1]

    async def talk(source: str, port: int, data: bytes) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
        try:
            writer.write(data)
            await writer.drain()
            return await asyncio.wait_for(reader.read(), timeout=5)
        except ConnectionResetError:
            return b""
        finally:
            writer.close()

    async def first_reply() -> bytes:
        reply = await talk("127.0.0.1", ac_port, b"")
        return reply if reply.startswith(b"down") else b""

    deadline = asyncio.get_running_loop().time() + 5
    while not (reply := await first_reply()) and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)
    assert reply == b"down ready\n", reply  # no '#' text at all
    assert await talk("127.0.0.2", ac_port, b"") == b""
    get = b"GET /health HTTP/1.1\r\nHost: node\r\nConnection: close\r\n\r\n"
    assert (await talk("127.0.0.1", http_port, get)).startswith(b"HTTP/1.1 503")
    assert await talk("127.0.0.2", http_port, get) == b""
    assert await talk("127.0.0.2", http_port, b"GET /status HTTP/1.1\r\nHost: n\r\n\r\n") == b""
    assert agent.agent.agent_check.denied == 1 and agent.agent._web.guard.dropped["refused"] == 2


class Hostile:
    """A dependency that answers every request with a redirect whose Location carries terminal escapes."""

    LOCATION = b"/x\x1b]0;pwned\x07\x1b[2J\x1b[31mred"

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.recv(65536)
                conn.sendall(b"HTTP/1.1 302 Found\r\nLocation: " + self.LOCATION +
                             b"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")

    def close(self) -> None:
        self.sock.close()


def test_hostile_text_reaches_no_terminal(tmp_path: Path) -> None:
    """A Location header and a multi-line command output full of ESC sequences end up as one printable
    line in ?verbose, /health/<check>, /status, and in `healthgate status|explain|check` (--color never)."""
    dep = Hostile()
    script = tmp_path / "noisy.sh"
    script.write_text("#!/bin/sh\nprintf '\\033[2J\\033]0;owned\\007first\\rsecond\\nthird'\nexit 2\n")
    script.chmod(0o755)
    checks = toml_table("[[checks]]", name="web", type="http", url=f"http://127.0.0.1:{dep.port}/",
                        interval="200ms", timeout="150ms", rise=1, fall=1)
    checks += toml_table("[[checks]]", name="noisy", type="exec", command=[str(script)], interval="200ms",
                         timeout="150ms", rise=1, fall=1)
    agent = AgentProcess(tmp_path, agent_toml({"admin_socket": ""}) + checks.replace("'", '"')).start()
    try:
        wait_for(lambda: "owned" in agent.get("/health/noisy")[1] and "pwned" in agent.get("/health/web")[1],
                 what="both reasons")
        outputs = {p: agent.get(p)[1] for p in ("/health?verbose", "/health/web", "/health/noisy")}
        outputs["/status (decoded)"] = json.dumps(json.loads(agent.get("/status")[1]), ensure_ascii=False)
        for cmd in (("status", "--color", "never"), ("explain",), ("check", "--color", "never")):
            proc = cli(*cmd, "-c", str(agent.path))
            outputs[cmd[0]] = proc.stdout + proc.stderr
    finally:
        agent.stop()
        dep.close()
    for name, text in outputs.items():
        assert "\x1b" not in text and "\x07" not in text and "\r" not in text, name
    for name in ("/health/web", "/health/noisy"):
        assert outputs[name].count("\n") == 1, outputs[name]
    assert "\\x1b[2J\\x1b]0;owned\\x07first second" in outputs["/health/noisy"], outputs["/health/noisy"]
    assert "\\x1b]0;pwned\\x07" in outputs["status"] and "\\x1b" in outputs["explain"]

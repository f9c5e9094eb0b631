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

import pytest

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
    """A dependency that answers every request with a redirect whose Location `location(request head)` says:
    by default one carrying terminal escapes."""

    LOCATION = b"/x\x1b]0;pwned\x07\x1b[2J\x1b[31mred"

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def location(self, head: bytes) -> bytes:
        return self.LOCATION

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                location = self.location(conn.recv(65536))
                conn.sendall(b"HTTP/1.1 302 Found\r\nLocation: " + location +
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


class Echo(Hostile):
    """A dependency that echoes the X-Api-Key it was sent in its Location header."""

    def location(self, head: bytes) -> bytes:
        key = next((line.split(b":", 1)[1].strip() for line in head.split(b"\r\n")
                    if line.lower().startswith(b"x-api-key:")), b"")
        return b"/?k=" + key


def test_secrets_with_quotes_backslashes_and_non_ascii_leave_through_no_output(tmp_path: Path) -> None:
    """A dependency and an exec check that echo their secrets back (with `"`, `\\` and non-ASCII in them)
    leak them into no output: /status, ?verbose, /health/<check>, the journal, /metrics, the log and the
    agent-check reply; the exec check also echoes the other check's secret, which its own runner pass
    does not know."""
    api_key = 'k3y"with\\back'
    token = 'tök"en\\ü-5ecret'
    dep = Echo()
    script = tmp_path / "echo.sh"
    script.write_text('#!/bin/sh\nprintf "CRITICAL: token %s key %s\\n" "$HG_TOKEN" "$1"\nexit 2\n')
    script.chmod(0o755)
    ac_port = free_port()
    config = agent_toml({"admin_socket": ""}, log_level="debug") + toml_table(
        "[agent_check]", listen=f"127.0.0.1:{ac_port}", weight_source="off")
    config += (f'\n[[checks]]\nname = "api"\ntype = "http"\nurl = "http://127.0.0.1:{dep.port}/"\n'
               f'interval = "200ms"\ntimeout = "150ms"\nrise = 1\nfall = 1\n'
               f'headers = {{ X-Api-Key = {json.dumps(api_key)} }}\n'
               f'\n[[checks]]\nname = "job"\ntype = "exec"\ncommand = ["{script}", {json.dumps(api_key)}]\ninterval = "200ms"\n'
               f'timeout = "150ms"\nrise = 1\nfall = 1\nenv = {{ HG_TOKEN = {json.dumps(token)} }}\n')
    agent = AgentProcess(tmp_path, config).start()
    try:
        wait_for(lambda: "***" in agent.get("/health/job")[1] and "***" in agent.get("/health/api")[1],
                 what="both checks failed with their secret masked")
        outputs = {p: agent.get(p)[1] for p in ("/status", "/health?verbose", "/health/api", "/health/job",
                                                 "/status/journal", "/metrics")}
        for p in ("/status", "/status/journal"):
            outputs[p + " (decoded)"] = json.dumps(json.loads(outputs[p]), ensure_ascii=False)
        with socket.create_connection(("127.0.0.1", ac_port), timeout=5) as s:
            outputs["agent-check"] = s.recv(4096).decode()
    finally:
        agent.stop()
        dep.close()
    outputs["log"] = agent.logs()
    outputs["log (decoded)"] = "\n".join(json.dumps(json.loads(line), ensure_ascii=False)
                                         for line in agent.logs().splitlines() if line.startswith("{"))
    forms = [api_key, token, json.dumps(api_key)[1:-1], json.dumps(token)[1:-1], "5ecret", "with\\back"]
    for name, text in outputs.items():
        assert not [f for f in forms if f in text], f"{name} leaks a secret: {text[:2000]}"
    assert "down ready" in outputs["agent-check"]


@pytest.mark.skipif(os.geteuid() != 0, reason="the root rule applies as root")
def test_every_command_applies_the_same_trust_and_root_rules(tmp_path: Path) -> None:
    """As root, check, status, explain, drain, maint and ready refuse a config others can write (no exec
    check runs, no token file is read and sent), and refuse a config without allow_root = true."""
    marker = tmp_path / "ran-as-root"
    base = (toml_table("[server]", listen="127.0.0.1:1", admin_socket="")
            + toml_table("[agent]", state_dir=str(tmp_path / "state"))
            + f'\n[[checks]]\nname = "x"\ntype = "exec"\ncommand = ["/bin/touch", "{marker}"]\n')
    commands = (("check",), ("status",), ("explain",), ("drain", "--no-wait"), ("maint", "--no-wait"),
                ("ready", "--no-wait"))
    shared = tmp_path / "shared.toml"
    shared.write_text(base.replace("[agent]", "[agent]\nallow_root = true"))
    shared.chmod(0o664)
    no_root = tmp_path / "no-root.toml"
    no_root.write_text(base)
    no_root.chmod(0o644)
    for cmd in commands:
        proc = cli(*cmd, "-c", str(shared))
        assert proc.returncode in (2, 3) and "refusing a file others can change while running as root" in \
            proc.stderr, (cmd, proc.stderr)
        proc = cli(*cmd, "-c", str(no_root))
        assert proc.returncode in (2, 3) and "agent.allow_root: refusing to run as root" in proc.stderr, (cmd, proc.stderr)
    assert not marker.exists() and not (tmp_path / "state").exists()

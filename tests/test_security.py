"""Bearer tokens: details for a trusted network or the token only (a real non-loopback client in network namespaces
of our own), bad credentials of any shape, token file modes and rotation; the token never leaves the agent."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import random
import secrets
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import logs
from agent.app import read_tokens
from agent.config import ConfigError, parse_config
from agent.model import Admin
from tests.helpers import (
    PASSING,
    ROOT,
    AgentProcess,
    agent_toml,
    async_wait_for,
    free_port,
    memory_check,
    wait_for,
)

CLIENT = r"""
import json, sys, time, urllib.error, urllib.request
base, cases = sys.argv[1], json.loads(sys.argv[2])
deadline = time.monotonic() + 20
while True:
    try:
        urllib.request.urlopen(base + "/live", timeout=1)
        break
    except Exception:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.1)
out = []
for path, headers in cases:
    req = urllib.request.Request(base + path, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            out.append([r.status, r.read().decode()])
    except urllib.error.HTTPError as e:
        out.append([e.code, e.read().decode()])
print(json.dumps(out))
"""


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, text=True, timeout=30)


@pytest.fixture
def netns() -> Iterator[dict[str, str]]:
    """Two network namespaces joined by a veth pair with private addresses; nothing touches the host's
    own network namespace, and both are deleted (with their links) at teardown."""
    if os.geteuid() != 0:
        pytest.skip("creating network namespaces needs root")
    ip = "/usr/sbin/ip" if os.path.exists("/usr/sbin/ip") else "ip"
    tag = secrets.token_hex(3)
    net = f"10.254.{random.randrange(256)}"
    spec = {"agent_ns": f"hg-a-{tag}", "client_ns": f"hg-b-{tag}", "agent_ip": f"{net}.1", "client_ip": f"{net}.2"}
    created: list[str] = []
    try:
        for ns in (spec["agent_ns"], spec["client_ns"]):
            try:
                sh(ip, "netns", "add", ns)
            except (subprocess.CalledProcessError, FileNotFoundError) as e:
                pytest.skip(f"network namespaces are not permitted here: {getattr(e, 'stderr', e)}")
            created.append(ns)
        a, b = spec["agent_ns"], spec["client_ns"]
        sh(ip, "link", "add", f"hga{tag}", "netns", a, "type", "veth", "peer", "name", f"hgb{tag}", "netns", b)
        for ns, dev, addr in ((a, f"hga{tag}", spec["agent_ip"]), (b, f"hgb{tag}", spec["client_ip"])):
            sh(ip, "-n", ns, "addr", "add", f"{addr}/30", "dev", dev)
            sh(ip, "-n", ns, "link", "set", dev, "up")
            sh(ip, "-n", ns, "link", "set", "lo", "up")
        spec["ip"] = ip
        yield spec
    finally:
        for ns in created:
            subprocess.run([ip, "netns", "del", ns], capture_output=True, timeout=30)


def client(ip: str, ns: str, base: str, cases: list) -> list[tuple[int, str]]:
    proc = subprocess.run([ip, "netns", "exec", ns, sys.executable, "-c", CLIENT, base, json.dumps(cases)],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    return [tuple(x) for x in json.loads(proc.stdout)]


def test_status_details_need_a_trusted_network_or_the_token(netns: dict[str, str], tmp_path: Path) -> None:
    """A non-loopback client gets pass/fail only, unless it presents the bearer token (a token that is not
    UTF-8 is just wrong); a trusted network gets details; the token appears in no response, metric or log line."""
    token = "tok-" + secrets.token_hex(16)
    token_file = tmp_path / "status.token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    port = free_port()
    config = agent_toml({"status_token_file": str(token_file)}, log_level="debug").replace(
        "127.0.0.1:{port}", "0.0.0.0:{port}") + memory_check()
    agent = AgentProcess(tmp_path, config, port=port, wrapper=(netns["ip"], "netns", "exec", netns["agent_ns"]))
    agent.start(wait=False)
    try:
        remote = f"http://{netns['agent_ip']}:{port}"
        cases = [
            ["/status", {}],
            ["/status", {"Authorization": "Bearer wrong-" + token[4:]}],
            ["/status", {"Authorization": "Bearer " + token[:-1]}],
            ["/status", {"Authorization": token}],
            ["/status", {"Authorization": "Basic " + token}],
            ["/status", {"Authorization": "Bearer " + token}],
            ["/metrics", {}],
            ["/health", {"Authorization": "Bearer " + token}],
            ["/status", {"Authorization": "Bearer \xff"}],  # http.client sends it as the byte 0xff
        ]
        seen = client(netns["ip"], netns["client_ns"], remote, cases)
        local = client(netns["ip"], netns["agent_ns"], f"http://127.0.0.1:{port}", [["/status", {}]])
    finally:
        agent.stop()

    bodies = [json.loads(body) for _, body in seen[:6]]
    for body in bodies[:5]:
        assert body in ({"status": "pass"}, {"status": "fail"}), body  # pass/fail only, no detail
    assert "checks" in bodies[5] and "mem:memory" in bodies[5]["checks"]  # the token unlocks details
    assert "checks" in json.loads(local[0][1])  # 127.0.0.1 is a trusted network here (agent_toml lists it)
    everything = "\n".join(body for _, body in seen + local) + agent.logs()
    assert token not in everything and token[4:] not in everything
    assert netns["client_ip"] not in json.dumps(bodies[5])
    assert seen[8][0] in (200, 503) and json.loads(seen[8][1]) in ({"status": "pass"}, {"status": "fail"}), seen[8]
    assert '"level": "error"' not in agent.logs()


async def test_token_never_leaves_the_agent(start_agent, tmp_path: Path) -> None:
    """With a status token configured and used by an untrusted client (so that the token, not the address,
    is what unlocks /status), no response, metric or log line contains it; without it /status is refused."""
    token = "tok-" + secrets.token_hex(16)
    token_file = tmp_path / "status.token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    lines = io.StringIO()
    handler = logging.StreamHandler(lines)
    handler.setFormatter(logs.JsonFormatter())
    level = logs.log.level
    logs.log.addHandler(handler)
    logs.log.setLevel(logging.DEBUG)
    try:
        agent = await start_agent({"server": {"status_token_file": str(token_file), "trusted_networks": []},
                                   "checks": [{"name": "mem", "type": "memory", "interval": "200ms",
                                               "timeout": "100ms", "rise": 1, "max_used_percent": 100}]})
        auth = {"Authorization": f"Bearer {token}"}
        await async_wait_for(lambda: _up(agent), timeout=5, what="up")
        seen = [await agent.get(path, headers=auth) for path in ("/status", "/metrics", "/health", "/live", "/nope")]
        bare = await agent.get("/status")
        wrong = await agent.get("/status", headers={"Authorization": f"Bearer {token[:-1]}x"})
    finally:
        logs.log.removeHandler(handler)
        logs.log.setLevel(level)
    assert seen[0][0] == 200 and "mem:memory" in json.loads(seen[0][1])["checks"]
    # The token really was compared: without it, or with a wrong one, /status is the bare verdict only.
    assert json.loads(bare[1]) == json.loads(wrong[1]) == {"status": "pass"}, (bare, wrong)
    assert '"event": "started"' in lines.getvalue()
    assert token not in "\n".join(body for _, body in seen) + lines.getvalue()

async def _up(agent) -> bool:
    return (await agent.get("/health"))[0] == 200


class _Lines(logging.Handler):
    """Every record from every logger (healthgate's and aiohttp's), for counting lines by level."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


async def raw_request(url: str, request: bytes) -> bytes:
    """Send bytes as they are (no client library re-encodes them) and read the answer to EOF."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), timeout=5)
    finally:
        writer.close()


async def test_bad_credentials_of_any_shape_are_a_401_logged_at_a_bounded_rate(start_agent, tmp_path: Path) -> None:
    """Authorization headers that are not UTF-8, not Bearer or empty get a 401 on /admin/* (a wrong token
    too), never a 500; forty of them log one warning line and nothing at ERROR."""
    token_file = tmp_path / "admin.token"
    token_file.write_text("s3cret-token\n")
    token_file.chmod(0o600)
    lines = _Lines()
    watched = [logging.getLogger(), logs.log, logging.getLogger("aiohttp")]
    for logger in watched:
        logger.addHandler(lines)
    try:
        agent = await start_agent({"server": {"admin_token_file": str(token_file)},
                                   "checks": [{"name": "mem", "type": "memory", "max_used_percent": 100}]})
        shapes = [b"Bearer \xff", b"Bearer s3cret-token\xff", b"bearer \xc3\x28", b"Basic \xff\xfe", b"Bearer ",
                  b"Bearer", b"Digest x", b"\xff"]
        answers = []
        for i in range(40):
            request = (b"POST /admin/drain HTTP/1.1\r\nHost: node\r\nAuthorization: " + shapes[i % len(shapes)]
                       + b"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            answers.append(await raw_request(agent.url, request))
        wrong = await raw_request(agent.url, b"POST /admin/drain HTTP/1.1\r\nHost: node\r\n"
                                  b"Authorization: Bearer wrong\r\nConnection: close\r\n\r\n")
    finally:
        for logger in watched:
            logger.removeHandler(lines)
    assert {a.split(b"\r\n", 1)[0] for a in answers} == {b"HTTP/1.1 401 Unauthorized"}, answers[:3]
    assert wrong.startswith(b"HTTP/1.1 401 "), wrong
    assert agent.state.admin is Admin.READY
    records = {id(r): r for r in lines.records}.values()  # a record may reach two of the loggers
    assert not [r for r in records if r.levelno >= logging.ERROR], [r.getMessage() for r in records]
    refused = [r for r in records if r.getMessage() == "bad_credentials"]
    assert len(refused) == 1 and refused[0].levelno == logging.WARNING, refused
    assert "s3cret" not in repr([r.__dict__ for r in records])


def test_a_token_file_others_can_read_is_refused(tmp_path: Path) -> None:
    """A token file of the agent's user that its group or others can read is refused, naming its mode and
    the fix; 0600 is accepted, and 0640 too when root owns the file (root hands it to the agent's group)."""
    token = tmp_path / "status.token"
    token.write_text("s3cret-token\n")
    cfg = parse_config({"server": {"status_token_file": str(token)}, "checks": [PASSING]})
    root = os.geteuid() == 0
    fix = "640" if root else "600"
    for mode in (0o644, 0o604, *(() if root else (0o660, 0o640))):  # as root, 0660 is refused as writable
        token.chmod(mode)
        with pytest.raises(ConfigError) as refused:
            read_tokens(cfg)
        what = "more than owner and group read" if root else "its group or others can read it"
        assert refused.value.errors == [f"server.status_token_file: refusing a secret others can read: {token} has "
                                        f"mode {mode:04o}{',' if root else ':'} {what} (fix: chmod {fix} {token})"]
        assert "s3cret" not in str(refused.value.errors)
    for mode in (0o600, 0o400, *((0o640, 0o440) if root else ())):
        token.chmod(mode)
        assert read_tokens(cfg)["status"] == "s3cret-token"


def post(url: str, token: str) -> int:
    req = urllib.request.Request(url, method="POST", headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code


def test_a_rotated_token_takes_effect_on_sighup(tmp_path: Path) -> None:
    """A token file replaced on disk changes nothing until SIGHUP, which swaps the token; a reload that
    finds the new file readable by others is refused and the token in force stays."""
    token = tmp_path / "admin.token"

    def rotate(text: str) -> None:
        new = tmp_path / "admin.token.new"
        new.write_text(text + "\n")
        new.chmod(0o600)
        os.replace(new, token)  # how a secret is rotated: never a half-written file

    rotate("old-token")
    agent = AgentProcess(tmp_path, agent_toml({"admin_token_file": str(token)}) + memory_check()).start()
    ready = agent.url + "/admin/ready"
    try:
        assert post(ready, "old-token") == 200
        rotate("new-token")
        assert post(ready, "old-token") == 200 and post(ready, "new-token") == 401
        agent.signal(signal.SIGHUP)
        wait_for(lambda: post(ready, "new-token") == 200, what="the rotated token after SIGHUP")
        assert post(ready, "old-token") == 401
        token.chmod(0o644)
        agent.signal(signal.SIGHUP)
        wait_for(lambda: "refusing a secret others can read" in agent.logs(), what="the reload refused")
        assert post(ready, "new-token") == 200
    finally:
        agent.stop()
    assert "new-token" not in agent.logs() and "old-token" not in agent.logs()

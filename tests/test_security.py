"""/status details only for loopback or a bearer token, seen from a real non-loopback client in network
namespaces of our own; the token never leaves the agent."""

from __future__ import annotations

import io
import json
import logging
import os
import random
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import logs
from tests.helpers import ROOT, AgentProcess, agent_toml, async_wait_for, free_port, memory_check

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


def test_status_details_need_loopback_or_the_token(netns: dict[str, str], tmp_path: Path) -> None:
    """A non-loopback client gets pass/fail only, unless it presents the bearer token; loopback gets
    details; the token appears in no response, metric or log line."""
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
        ]
        seen = client(netns["ip"], netns["client_ns"], remote, cases)
        local = client(netns["ip"], netns["agent_ns"], f"http://127.0.0.1:{port}", [["/status", {}]])
    finally:
        agent.stop()

    bodies = [json.loads(body) for _, body in seen[:6]]
    for body in bodies[:5]:
        assert body in ({"status": "pass"}, {"status": "fail"}), body  # pass/fail only, no detail
    assert "checks" in bodies[5] and "mem:memory" in bodies[5]["checks"]  # the token unlocks details
    assert "checks" in json.loads(local[0][1])  # loopback inside the namespace: details
    everything = "\n".join(body for _, body in seen + local) + agent.logs()
    assert token not in everything and token[4:] not in everything
    assert netns["client_ip"] not in json.dumps(bodies[5])


async def test_token_never_leaves_the_agent(start_agent, tmp_path: Path) -> None:
    """With a status token configured and used, no response, metric or log line contains it."""
    token = "tok-" + secrets.token_hex(16)
    token_file = tmp_path / "status.token"
    token_file.write_text(token + "\n")
    lines = io.StringIO()
    handler = logging.StreamHandler(lines)
    handler.setFormatter(logs.JsonFormatter())
    level = logs.log.level
    logs.log.addHandler(handler)
    logs.log.setLevel(logging.DEBUG)
    try:
        agent = await start_agent({"server": {"status_token_file": str(token_file)},
                                   "checks": [{"name": "mem", "type": "memory", "interval": "200ms",
                                               "timeout": "100ms", "rise": 1, "max_used_percent": 100}]})
        auth = {"Authorization": f"Bearer {token}"}
        await async_wait_for(lambda: _up(agent), timeout=5, what="up")
        seen = [await agent.get(path, headers=auth) for path in ("/status", "/metrics", "/health", "/live", "/nope")]
    finally:
        logs.log.removeHandler(handler)
        logs.log.setLevel(level)
    assert seen[0][0] == 200 and "mem:memory" in json.loads(seen[0][1])["checks"]
    assert '"event": "started"' in lines.getvalue()
    assert token not in "\n".join(body for _, body in seen) + lines.getvalue()

async def _up(agent) -> bool:
    return (await agent.get("/health"))[0] == 200

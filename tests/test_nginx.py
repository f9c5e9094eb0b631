"""deploy/nginx: the node-local proxy with the real nginx; the NGINX Plus example as far as nginx can."""

from __future__ import annotations

import re
import signal
import subprocess
import urllib.request
from pathlib import Path

import crossplane
import pytest

from tests.helpers import ROOT, AgentProcess, agent_toml, free_port, http_get, require, wait_for

DEPLOY = ROOT / "deploy" / "nginx"
PROXY = DEPLOY / "healthgate-proxy.conf"
PLUS = DEPLOY / "healthgate-plus.conf"

# The parameters NGINX Plus documents for health_check, and the tests a match block may hold.
HEALTH_CHECK_PARAMS = {"interval", "jitter", "fails", "passes", "uri", "mandatory", "persistent", "match", "port",
                       "type", "grpc_service", "grpc_status", "keepalive_time"}
MATCH_TESTS = {"status", "header", "body", "require"}

AGENT = agent_toml({"trusted_networks": []}) + """
[[checks]]
name = "dep"
type = "tcp"
port = %d
interval = "100ms"
timeout = "80ms"
rise = 1
fall = 1
"""


def main_conf(tmp: Path, include: Path) -> Path:
    """A minimal nginx.conf around an http-level file, everything under the tmp prefix."""
    conf = tmp / "nginx.conf"
    conf.write_text(f"""
worker_processes 1;
error_log {tmp / "error.log"} warn;
events {{ worker_connections 64; }}
http {{
    access_log off;
    include {include};
}}
""")
    return conf


def nginx_test(tmp: Path, include: Path) -> subprocess.CompletedProcess:
    nginx = require("nginx", "nginx")
    conf = main_conf(tmp, include)
    return subprocess.run([nginx, "-t", "-q", "-p", str(tmp), "-e", str(tmp / "error.log"), "-c", str(conf),
                           "-g", f"pid {tmp / 'nginx.pid'};"], capture_output=True, text=True, timeout=30)


def test_nginx_t_accepts_the_proxy_config(tmp_path: Path) -> None:
    """`nginx -t` accepts healthgate-proxy.conf exactly as shipped."""
    proc = nginx_test(tmp_path, PROXY)
    assert proc.returncode == 0, proc.stderr


def request(url: str, method: str = "GET") -> tuple[int, str, dict[str, str]]:
    req = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, resp.read().decode(), dict(resp.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(), dict(e.headers)


@pytest.fixture
def nginx(tmp_path: Path):
    """The shipped proxy config on a free loopback port in front of an agent port; nginx in the foreground."""
    binary = require("nginx", "nginx")
    procs: list[subprocess.Popen] = []

    def start(agent_port: int) -> str:
        port = free_port()
        text = PROXY.read_text()
        assert text.count("listen 80;") == 1 and text.count("127.0.0.1:8080") == 1
        conf = tmp_path / "healthgate-proxy.conf"
        conf.write_text(text.replace("listen 80;", f"listen 127.0.0.1:{port};")
                        .replace("127.0.0.1:8080", f"127.0.0.1:{agent_port}"))
        main = main_conf(tmp_path, conf)
        procs.append(subprocess.Popen(
            [binary, "-p", str(tmp_path), "-e", str(tmp_path / "error.log"), "-c", str(main),
             "-g", f"daemon off; pid {tmp_path / 'nginx.pid'};"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: procs[-1].poll() is not None or http_get(url + "/health")[0] > 0, what="nginx listening")
        assert procs[-1].poll() is None, (tmp_path / "error.log").read_text()
        return url

    yield start
    for p in procs:
        p.send_signal(signal.SIGQUIT)
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def plus_matches(block: list[dict], status: int, headers: dict[str, str], body: str) -> bool:
    """Evaluate an NGINX Plus `match` block (status, header ~, body ~) against one response."""
    for d in block:
        args = d["args"]
        if d["directive"] == "status":
            if str(status) not in args:
                return False
        elif d["directive"] == "header":
            name, op, pattern = args
            assert op == "~", op
            if not re.search(pattern, headers.get(name, "")):
                return False
        elif d["directive"] == "body":
            op, pattern = args
            assert op == "~", op
            if not re.search(pattern, body):
                return False
        else:
            raise AssertionError(f"untested match directive {d['directive']}")
    return True


def healthgate_up_match(tmp: Path) -> list[dict]:
    tmp.mkdir()
    parsed = crossplane.parse(str(main_conf(tmp, PLUS)), check_ctx=True, check_args=True)
    (block,) = [d["block"] for d in parsed["config"][1]["parsed"] if d["directive"] == "match"]
    return block


def test_proxy_never_answers_200_unless_the_agent_says_up(agent_process, dependency, nginx, tmp_path) -> None:
    """Through the node-local nginx: 200 while the agent is up, the agent's 503 when its verdict is down,
    502 when the agent hangs or is killed, and 200 again on the first probe after a restart."""
    agent = agent_process(AGENT % dependency.port)
    wait_for(lambda: agent.get("/health")[0] == 200, what="agent up")
    # A request with a query is aiohttp's, which the agent imports (in a thread) when the first one comes:
    # a few hundred ms, over nginx's 1 s read timeout on a busy machine. Load it here, so what follows
    # measures the proxy, not that import.
    assert agent.get("/ready?verbose", timeout=10)[0] == 200
    url = nginx(agent.port)
    match = healthgate_up_match(tmp_path / "plus")

    status, body, headers = request(url + "/health")
    assert (status, body) == (200, "up\n")
    assert plus_matches(match, status, headers, body), "the NGINX Plus match block must accept healthgate's up"
    assert request(url + "/health", "HEAD")[0] == 200
    assert request(url + "/ready?verbose")[1].endswith("healthz check passed\n")
    assert request(url + "/health/dep")[:2] == (200, "up\n")
    assert request(url + "/live")[0] == 404, "only the verdict paths are proxied"

    agent.signal(signal.SIGSTOP)  # hung agent: nginx's read timeout, not a hang of the prober
    try:
        assert request(url + "/health")[:2] == (502, "down: healthgate unreachable\n")
    finally:
        agent.signal(signal.SIGCONT)
    # Back from the stall the agent fails closed for loop_recovery, then serves up again.
    assert request(url + "/health")[:2] == (503, "down\n")
    wait_for(lambda: request(url + "/health")[:2] == (200, "up\n"), what="up after loop_recovery")

    dependency.close()
    wait_for(lambda: agent.get("/health")[0] == 503, what="verdict down")
    status, body, headers = request(url + "/health")
    assert (status, body) == (503, "down\n"), "the agent's own 503 passes through"
    assert headers["Cache-Control"] == "no-store"
    assert not plus_matches(match, status, headers, body)
    # Every client of nginx arrives from loopback: none of them may read the reasons.
    verbose = request(url + "/ready?verbose&exclude=nosuch")[1]
    assert "[-]dep failed: reason withheld" in verbose and "tcp 127.0.0.1" not in verbose
    assert request(url + "/health?verbose")[1].count("reason withheld") == 1
    assert request(url + "/health/dep")[:2] == (503, "down\n")

    agent.stop()  # SIGKILL: the agent process is dead
    status, body, headers = request(url + "/health")
    assert (status, body) == (502, "down: healthgate unreachable\n")
    assert headers["Cache-Control"] == "no-store"
    assert not plus_matches(match, status, headers, body)

    (tmp_path / "restarted").mkdir()
    memory_only = (AGENT % dependency.port).replace('type = "tcp"', 'type = "memory"').replace(
        f"port = {dependency.port}", "max_used_percent = 100")
    restarted = AgentProcess(tmp_path / "restarted", memory_only, port=agent.port)
    try:
        restarted.start()
        wait_for(lambda: restarted.get("/health")[0] == 200, what="restarted agent up")
        assert request(url + "/health")[:2] == (200, "up\n"), "nginx must not remember the dead agent"
    finally:
        restarted.stop()


def test_plus_example_is_well_formed(tmp_path: Path) -> None:
    """The NGINX Plus example parses with directive contexts and arities checked, uses only documented
    health_check parameters, points match= at a defined block, and its upstream lives in a zone."""
    parsed = crossplane.parse(str(main_conf(tmp_path, PLUS)), check_ctx=True, check_args=True)
    assert parsed["status"] == "ok", parsed["errors"]
    http = parsed["config"][1]["parsed"]
    matches = {d["args"][0]: d["block"] for d in http if d["directive"] == "match"}
    upstreams = {d["args"][0]: d["block"] for d in http if d["directive"] == "upstream"}
    checks = [(loc, d) for srv in http if srv["directive"] == "server"
              for loc in srv["block"] if loc["directive"] == "location"
              for d in loc["block"] if d["directive"] == "health_check"]
    assert checks
    for loc, hc in checks:
        params = dict(a.split("=", 1) if "=" in a else (a, "") for a in hc["args"])
        assert set(params) <= HEALTH_CHECK_PARAMS, params
        assert params["uri"] == "/health" and params["match"] in matches
        (proxy_pass,) = [d["args"][0] for d in loc["block"] if d["directive"] == "proxy_pass"]
        assert any(d["directive"] == "zone" for d in upstreams[proxy_pass.removeprefix("http://")])
    for block in matches.values():
        assert {d["directive"] for d in block} <= MATCH_TESTS
    up = matches["healthgate_up"]
    assert plus_matches(up, 200, {"Content-Type": "text/plain; charset=utf-8"}, "up\n")
    assert not plus_matches(up, 200, {"Content-Type": "text/html"}, "<html>up</html>")
    assert not plus_matches(up, 503, {"Content-Type": "text/plain; charset=utf-8"}, "down\n")


def test_nginx_t_accepts_the_plus_example_without_plus_directives(tmp_path: Path) -> None:
    """Open-source `nginx -t` accepts the NGINX Plus example once its Plus-only directives (match,
    health_check) are removed: everything else in it is valid nginx."""
    parsed = crossplane.parse(str(main_conf(tmp_path, PLUS)), check_ctx=True, check_args=True)

    def strip(block: list[dict]) -> list[dict]:
        out = []
        for d in block:
            if d["directive"] in ("match", "health_check"):
                continue
            out.append({**d, "block": strip(d["block"])} if "block" in d else d)
        return out

    stripped = strip(parsed["config"][1]["parsed"])
    assert len(stripped) == len(parsed["config"][1]["parsed"]) - 1
    oss = tmp_path / "healthgate-plus-oss.conf"
    oss.write_text(crossplane.build(stripped))
    assert "health_check" not in oss.read_text() and "zone app_backend 64k" in oss.read_text()
    proc = nginx_test(tmp_path, oss)
    assert proc.returncode == 0, proc.stderr
    # And the unstripped file is refused by open-source nginx: the test above really removed something.
    assert nginx_test(tmp_path, PLUS).returncode != 0

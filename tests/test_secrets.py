"""Secrets (URL passwords, DSNs, auth headers, redis passwords) never leave the agent: every output is grepped."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import types
from urllib.parse import quote

from agent.model import Observation
from agent.probes import PROBES
from agent.probes.base import CheckFailed, Context
from agent.runner import Runner
from tests.helpers import ROOT, wait_for
from tests.servers import PG_PASSWORD

HTTP_PASS = "Http-pa55:w/rd"
HTTP_WRONG = "Http-wr0ng"
TOKEN = "tok-5ecret-bearer"
QUERY_TOKEN = "q-tok-5ecret"
REDIS_PASS = "Red1s-pa55 word"
REDIS_WRONG = "Red1s-wr0ng"
PG_WRONG = "Pg-wr0ng/@:%"

BASE = """
[server]
listen = "127.0.0.1:{port}"
shutdown_drain = 0
trusted_networks = ["127.0.0.1/32"]
[agent]
allow_root = true
log_level = "debug"
[policy]
flap_threshold = 0
"""


def toml_value(value: object) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    return json.dumps(value)  # a JSON string or number is a TOML one


def checks_toml(*checks: dict) -> str:
    return "".join("\n[[checks]]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in c.items()) for c in checks)


def forms(secret: str) -> set[str]:
    """A secret as written and as it could be re-encoded on the way out."""
    return {secret, quote(secret, safe=""), quote(secret)}


def leaks(text: str, secrets: list[str]) -> list[str]:
    return sorted({form for s in secrets for form in forms(s) if form in text})


def test_no_secret_in_any_output(agent_process, http_server, redis_factory, postgres_server) -> None:
    """With passing and failing (wrong credential) checks, no secret appears in /health, /ready, /live,
    /status, /metrics, the log, or `healthgate check`'s table."""
    basic = base64.b64encode(f"probe:{HTTP_PASS}".encode()).decode()
    http_server.auth = {f"Basic {basic}", f"Bearer {TOKEN}"}
    redis = redis_factory(password=REDIS_PASS)
    web, fast, slow = f"127.0.0.1:{http_server.port}", {"interval": "200ms", "timeout": "150ms"}, \
        {"interval": "500ms", "timeout": "400ms"}
    config = BASE + checks_toml(
        {"name": "api-ok", "type": "http", **fast,
         "url": f"http://probe:{quote(HTTP_PASS, safe='')}@{web}/auth?token={QUERY_TOKEN}"},
        {"name": "api-wrong-password", "type": "http", "url": f"http://probe:{HTTP_WRONG}@{web}/auth", **fast},
        {"name": "api-bearer", "type": "http", "url": f"http://{web}/auth", **fast,
         "headers": {"Authorization": f"Bearer {TOKEN}"}},
        {"name": "cache-ok", "type": "redis", "port": redis.port, "password": REDIS_PASS, **fast},
        {"name": "cache-wrong-password", "type": "redis", "port": redis.port, "password": REDIS_WRONG, **fast},
        {"name": "db-ok", "type": "postgres", "port": postgres_server.port, "user": "scram_user",
         "password": PG_PASSWORD, "database": "postgres", **slow},
        {"name": "db-wrong-dsn", "type": "postgres", **slow,
         "dsn": f"postgresql://scram_user:{quote(PG_WRONG, safe='')}@127.0.0.1:{postgres_server.port}/postgres"},
    )
    secrets = [HTTP_PASS, HTTP_WRONG, TOKEN, QUERY_TOKEN, REDIS_PASS, REDIS_WRONG, PG_PASSWORD, PG_WRONG,
               basic]
    agent = agent_process(config)

    failures = ("http: 401 after", "invalid username-password pair",
                'password authentication failed for user \\"scram_user\\"')

    def settled() -> bool:
        """Every failing check failed for its real reason and the passing ones passed: a leak had its chance."""
        body = json.loads(agent.get("/status")[1])
        passing = {name.split(":")[0] for name, [c] in body["checks"].items() if c["status"] == "pass"}
        text = json.dumps(body)
        return passing == {"api-ok", "api-bearer", "cache-ok", "db-ok"} and all(f in text for f in failures)

    wait_for(settled, timeout=15, what="checks sampled")
    outputs = {path: agent.get(path)[1] for path in ("/health", "/ready", "/live", "/status", "/metrics")}
    assert outputs["/metrics"].count("healthgate_check_up{") == 7
    check = subprocess.run([sys.executable, "-m", "agent", "check", "-c", str(agent.path), "--color", "never"],
                           capture_output=True, text=True, cwd=ROOT, timeout=60)
    outputs["healthgate check"] = check.stdout + check.stderr
    assert "authentication failed" in outputs["healthgate check"]
    agent.stop()
    outputs["log"] = agent.logs()
    assert '"event": "check_transition"' in outputs["log"]
    for name, text in outputs.items():
        assert not leaks(text, secrets), f"{name} leaks {leaks(text, secrets)}"


async def test_runner_masks_secrets_a_probe_lets_slip() -> None:
    """A failure reason or detail that quotes a secret (say, a driver echoing a DSN) is masked as ***."""

    async def echo(cfg, ctx):
        raise CheckFailed(f"cannot connect to {cfg.dsn}", "error")

    mod = types.ModuleType("echo")
    mod.Config, mod.probe = PROBES["postgres"].Config, echo
    cfg = PROBES["postgres"].Config(name="p", type="postgres", dsn="postgresql://u:p%40ss@db/x?password=two")
    r = await Runner(Context(), {"postgres": mod}).run(cfg)
    assert r.reason == "cannot connect to postgresql://u:***@db/x?password=***", r.reason


async def test_runner_masks_secrets_in_a_passing_observations_detail() -> None:
    """An observation's detail (shown on /status) that quotes a secret is masked as *** too."""

    async def echo(cfg, ctx):
        return Observation(1.0, "ratio", detail=f"connected to {cfg.dsn}")

    mod = types.ModuleType("echo")
    mod.Config, mod.probe = PROBES["postgres"].Config, echo
    cfg = PROBES["postgres"].Config(name="p", type="postgres", dsn="postgresql://u:p%40ss@db/x")
    r = await Runner(Context(), {"postgres": mod}).run(cfg)
    assert r.ok and r.observation.detail == "connected to postgresql://u:***@db/x", r.observation

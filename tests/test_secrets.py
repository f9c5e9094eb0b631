"""Secrets (URL passwords, DSNs, auth headers, redis passwords) never leave the agent: every output is grepped."""

from __future__ import annotations

import base64
import subprocess
import sys
import types
from urllib.parse import quote

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

CONFIG = """
[server]
listen = "127.0.0.1:{port}"
shutdown_drain = 0
[agent]
allow_root = true
log_level = "debug"
[policy]
flap_threshold = 0

[[checks]]
name = "api-ok"
type = "http"
url = "http://probe:%(http_pass)s@127.0.0.1:%(http_port)d/auth?token=%(query_token)s"
interval = "200ms"
timeout = "150ms"

[[checks]]
name = "api-wrong-password"
type = "http"
url = "http://probe:%(http_wrong)s@127.0.0.1:%(http_port)d/auth"
interval = "200ms"
timeout = "150ms"

[[checks]]
name = "api-bearer"
type = "http"
url = "http://127.0.0.1:%(http_port)d/auth"
headers = { Authorization = "Bearer %(token)s" }
interval = "200ms"
timeout = "150ms"

[[checks]]
name = "cache-ok"
type = "redis"
port = %(redis_port)d
password = "%(redis_pass)s"
interval = "200ms"
timeout = "150ms"

[[checks]]
name = "cache-wrong-password"
type = "redis"
port = %(redis_port)d
password = "%(redis_wrong)s"
interval = "200ms"
timeout = "150ms"

[[checks]]
name = "db-ok"
type = "postgres"
port = %(pg_port)d
user = "scram_user"
password = "%(pg_pass)s"
database = "postgres"
interval = "500ms"
timeout = "400ms"

[[checks]]
name = "db-wrong-dsn"
type = "postgres"
dsn = "postgresql://scram_user:%(pg_wrong_q)s@127.0.0.1:%(pg_port)d/postgres"
interval = "500ms"
timeout = "400ms"
"""


def forms(secret: str) -> set[str]:
    """A secret as written and as it could be re-encoded on the way out."""
    return {secret, quote(secret, safe=""), quote(secret)}


def leaks(text: str, secrets: list[str]) -> list[str]:
    return sorted({form for s in secrets for form in forms(s) if form in text})


def test_no_secret_in_any_output(agent_process, http_server, redis_factory, postgres_server) -> None:
    """With passing and failing (wrong credential) checks, no secret appears in /health, /ready, /live,
    /status, /metrics, the log, or `healthgate check`'s table."""
    http_server.auth = "Basic " + base64.b64encode(f"probe:{HTTP_PASS}".encode()).decode()
    redis = redis_factory(password=REDIS_PASS)
    config = CONFIG % {
        "http_port": http_server.port, "http_pass": quote(HTTP_PASS, safe=""), "http_wrong": HTTP_WRONG,
        "query_token": QUERY_TOKEN, "token": TOKEN, "redis_port": redis.port, "redis_pass": REDIS_PASS,
        "redis_wrong": REDIS_WRONG, "pg_port": postgres_server.port, "pg_pass": PG_PASSWORD,
        "pg_wrong_q": quote(PG_WRONG, safe=""),
    }
    secrets = [HTTP_PASS, HTTP_WRONG, TOKEN, QUERY_TOKEN, REDIS_PASS, REDIS_WRONG, PG_PASSWORD, PG_WRONG,
               http_server.auth.split()[1]]
    agent = agent_process(config)

    def settled() -> bool:
        status = agent.get("/status")[1]
        return all(f'"componentId": "{n}"' in status for n in ("api-ok", "db-wrong-dsn")) and \
            '"status": "pass"' in status.split('"checks"')[1] and "authentication failed" in status

    wait_for(settled, timeout=15, what="checks sampled")
    wait_for(lambda: agent.get("/metrics")[1].count('healthgate_check_up{') == 7, what="metrics")
    outputs = {path: agent.get(path)[1] for path in ("/health", "/ready", "/live", "/status", "/metrics")}
    status = outputs["/status"]
    # The failures happened, for the right reasons, so the test could have caught a leak:
    assert "api-wrong-password" in status and "http: 401 after" in status
    assert "cache-wrong-password" in status and "invalid username-password pair" in status
    assert "db-wrong-dsn" in status and 'password authentication failed for user \\"scram_user\\"' in status
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

"""Memory footprint: probe modules, their models and client libraries load only with a config that uses them."""

from __future__ import annotations

import subprocess
import sys

from tests.helpers import ROOT

LIBS = ("redis", "asyncpg", "dns", "cryptography", "regex")
SCRIPT = """
import sys, tomllib
import agent.app, agent.cli.main
from agent.config import parse_config
parse_config(tomllib.loads(sys.argv[1]))
print(",".join(m for m in sys.argv[2].split(",") if m in sys.modules))
"""
PROBE_MODULES = """
import sys, tomllib
import agent.app, agent.cli.main
from agent.config import parse_config
parse_config(tomllib.loads(sys.argv[1]))
print(",".join(sorted(m.rsplit(".", 1)[1] for m in sys.modules
                      if m.startswith("agent.probes.") and m.rsplit(".", 1)[1] in sys.argv[2].split(","))))
"""


def loaded(config: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", SCRIPT, config, ",".join(LIBS)], cwd=ROOT, capture_output=True,
                         text=True, timeout=60, check=True)
    return set(filter(None, out.stdout.strip().split(",")))


def test_node_checks_load_no_client_library() -> None:
    """The default config (node checks) imports none of redis-py, asyncpg, dnspython, cryptography, regex."""
    config = (ROOT / "config" / "healthgate.toml").read_text()
    assert loaded(config) == set()


def test_the_agent_and_a_config_without_http_checks_load_no_aiohttp() -> None:
    """The running agent's modules and the default config import no aiohttp (the listener loads it for the
    first request the fast responder does not answer); an http check's config does."""
    config = (ROOT / "config" / "healthgate.toml").read_text()
    out = subprocess.run([sys.executable, "-c", SCRIPT.replace("agent.cli.main", "agent.cli.main, agent.serving.listener"), config,
                          "aiohttp,yarl,multidict"], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == ""
    http = config + '[[checks]]\nname = "web"\ntype = "http"\nurl = "http://127.0.0.1:1/"\n'
    out = subprocess.run([sys.executable, "-c", SCRIPT, http, "aiohttp"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60, check=True)
    assert out.stdout.strip() == "aiohttp"


def test_each_dependency_check_loads_its_library_with_the_config() -> None:
    """A redis, postgres, tls, server-asking dns or body_regex http check loads its library with the config."""
    config = """
[[checks]]
name = "r"
type = "redis"
[[checks]]
name = "p"
type = "postgres"
[[checks]]
name = "t"
type = "tls"
[[checks]]
name = "d"
type = "dns"
query_name = "example.test"
server = "127.0.0.1"
[[checks]]
name = "h"
type = "http"
url = "http://127.0.0.1:1/"
body_regex = "ok+"
"""
    assert loaded(config) == set(LIBS)
    assert loaded('[[checks]]\nname = "d"\ntype = "dns"\nquery_name = "example.test"\n') == set()


def test_a_config_loads_only_the_probe_modules_of_its_types() -> None:
    """The default config (a memory and a disk check) imports those two probe modules and no other."""
    from agent.probes import TYPES

    config = (ROOT / "config" / "healthgate.toml").read_text()
    out = subprocess.run([sys.executable, "-c", PROBE_MODULES, config, ",".join(TYPES)], cwd=ROOT,
                         capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.split() == ["disk,memory"]

"""The README's config examples are valid configs: documentation that drifts from the code fails here."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from agent.config import ConfigError, parse_config
from tests.helpers import PASSING, ROOT

BLOCKS = re.findall(r"```toml\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


@pytest.mark.parametrize("block", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_toml_example_validates(block: str) -> None:
    """Every TOML block in the README parses and validates as a config; a fragment without a critical check
    of its own (listener lines, an early-warning check) validates once one is added, and lacks nothing else."""
    data = tomllib.loads(block)
    try:
        parse_config(data)
    except ConfigError as e:
        assert len(e.errors) == 1 and e.errors[0].startswith("checks: "), e.errors
        assert "at least one critical check is required" in e.errors[0], e.errors
        parse_config({**data, "checks": [*data.get("checks", []), {**PASSING, "name": "readme-critical"}]})


def make(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "--no-print-directory", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=60)


def test_make_run_installs_only_what_the_agent_needs(tmp_path: Path) -> None:
    """`make run` installs the package with the fast extra only; `make test` adds the test tools."""
    if shutil.which("make") is None:
        pytest.skip("make not found: apt-get install make")
    venv = f"VENV={tmp_path / 'venv'}"
    run = make("-n", "run", venv)
    installs = [line for line in run.stdout.splitlines() if "pip install" in line and " -e " in line]
    assert installs and all("'.[fast]'" in line for line in installs), run.stdout
    test = make("-n", "test", venv)
    assert "'.[test,fast]'" in test.stdout, test.stdout


@pytest.mark.skipif(os.geteuid() != 0, reason="the root rule applies as root")
def test_make_run_as_root_says_the_way_forward_before_installing(tmp_path: Path) -> None:
    """As root, `make run` with a config that does not allow root prints how to go on and installs nothing."""
    if shutil.which("make") is None:
        pytest.skip("make not found: apt-get install make")
    venv = tmp_path / "venv"
    proc = make("run", f"VENV={venv}")
    assert proc.returncode != 0
    assert "refuses to run as root" in proc.stderr and "sudo -u" in proc.stderr, proc.stderr
    assert "make run CONFIG=config/healthgate.local.toml" in proc.stderr
    assert not venv.exists()


def test_license_is_an_spdx_expression() -> None:
    """project.license is an SPDX string (the table form is deprecated and warned about by setuptools)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0"

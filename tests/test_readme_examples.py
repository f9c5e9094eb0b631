"""The README's config examples are valid configs: documentation that drifts from the code fails here."""

from __future__ import annotations

import re
import tomllib

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

"""The README's config examples are valid configs: documentation that drifts from the code fails here."""

from __future__ import annotations

import re
import tomllib

import pytest

from agent.config import parse_config
from tests.helpers import ROOT

BLOCKS = re.findall(r"```toml\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


@pytest.mark.parametrize("block", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_toml_example_validates(block: str) -> None:
    """Every TOML block in the README parses and validates as a config."""
    parse_config(tomllib.loads(block))

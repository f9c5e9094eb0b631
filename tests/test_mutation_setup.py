"""`make mutate` runs mutmut over the trust core, as docs/mutation.md says; the run itself is not part of CI."""

from __future__ import annotations

import shutil
import subprocess
import tomllib

import pytest

from tests.helpers import ROOT

TRUST_CORE = ["agent/serving/decision.py", "agent/access.py", "agent/text.py", "agent/verdict.py", "agent/admin.py",
              "agent/serving/admin_watch.py"]


def test_mutmut_mutates_the_trust_core_and_the_report_names_it() -> None:
    """mutmut's config names exactly the trust core's modules, and the report names each of them."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mutmut"]
    assert config["only_mutate"] == TRUST_CORE
    report = (ROOT / "docs" / "mutation.md").read_text()
    assert all(f"`{m}`" in report for m in TRUST_CORE) and "make mutate" in report


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed (Debian package make)")
def test_make_mutate_runs_mutmut() -> None:
    """`make mutate` runs mutmut from the venv and lists its results (shown with make -n, nothing run)."""
    out = subprocess.run(["make", "-n", "mutate"], cwd=ROOT, capture_output=True, text=True, timeout=30, check=True)
    assert "/bin/mutmut run" in out.stdout and "/bin/mutmut results" in out.stdout

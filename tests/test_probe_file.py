"""file against a real heartbeat file: present, fresh, stale, from the future, with and without the right content."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.probing import check, sample


@pytest.fixture
def heartbeat(tmp_path: Path) -> Path:
    path = tmp_path / "heartbeat"
    path.write_text("status=serving\nepoch=42\n")
    return path


def age(path: Path, seconds: float) -> None:
    """Set the file's modification time `seconds` in the past (negative: in the future)."""
    t = time.time() - seconds
    os.utime(path, (t, t))


async def test_fresh_file_passes_with_its_age(heartbeat: Path) -> None:
    """A file touched just now passes, reporting its age in seconds."""
    r = await sample(check(type="file", path=str(heartbeat), max_age="30s"))
    assert r.ok, r.reason
    assert r.observation.unit == "seconds" and 0 <= r.observation.value < 5


async def test_stale_file_fails(heartbeat: Path) -> None:
    """A file not touched within max_age fails: the application's loop has stalled."""
    age(heartbeat, 120)
    r = await sample(check(type="file", path=str(heartbeat), max_age="1m"))
    assert (r.ok, r.kind) == (False, "stale")
    assert r.reason.startswith(f"file {heartbeat}: last modified 120.")
    assert r.reason.endswith("s ago > 1m (has the application stalled?)")
    age(heartbeat, 0)  # the application touches it again
    assert (await sample(check(type="file", path=str(heartbeat), max_age="1m"))).ok


async def test_file_from_the_future_fails(heartbeat: Path) -> None:
    """A modification time further in the future than max_age fails (a clock stepped back hides a stall)."""
    age(heartbeat, -600)
    r = await sample(check(type="file", path=str(heartbeat), max_age="1m"))
    assert (r.ok, r.kind) == (False, "clock")
    age(heartbeat, -1)  # a little skew is tolerated
    assert (await sample(check(type="file", path=str(heartbeat), max_age="1m"))).ok


async def test_missing_file_fails(tmp_path: Path) -> None:
    """A file that does not exist fails with kind `missing`."""
    r = await sample(check(type="file", path=str(tmp_path / "none")))
    assert (r.ok, r.kind, r.reason) == (False, "missing", f"file {tmp_path / 'none'}: does not exist")


@pytest.mark.parametrize("keys, ok, reason", [
    ({"contains": "status=serving"}, True, ""),
    ({"contains": "status=draining"}, False, "does not contain 'status=draining'"),
    ({"matches": r"^epoch=\d+$"}, True, ""),
    ({"matches": r"^status=(ok|ready)$"}, False, "does not match /^status=(ok|ready)$/"),
    ({"contains": "epoch", "matches": "serving"}, True, ""),
])
async def test_content_match(heartbeat: Path, keys: dict, ok: bool, reason: str) -> None:
    """`contains` and `matches` (multiline regex) must both hold when given."""
    r = await sample(check(type="file", path=str(heartbeat), **keys))
    assert (r.ok, r.reason) == (ok, f"file {heartbeat}: {reason}" if reason else "")
    if not ok:
        assert r.kind == "content"


async def test_directory_cannot_match_content(tmp_path: Path) -> None:
    """A directory exists and has an age, but content checks on it fail clearly."""
    assert (await sample(check(type="file", path=str(tmp_path), max_age="1h"))).ok
    r = await sample(check(type="file", path=str(tmp_path), contains="x"))
    assert r.reason == f"file {tmp_path}: not a regular file, cannot match its content"

"""disk on real mounts: a tmpfs remounted read-only, filled up, out of inodes; and a stuck statvfs contained."""

from __future__ import annotations

import os
import subprocess
import threading
import types
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.probes import PROBES
from agent.probes.base import Context
from agent.probes.blocking import blocking
from agent.probes.disk import mount_of, parse_mountinfo
from agent.runner import Runner
from tests.helpers import async_wait_for
from tests.probing import check, sample


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """Mount a small tmpfs (we run as root, as CI does); skipped with the reason where mount is refused."""
    mounted: list[Path] = []

    def mount(options: str = "size=4m") -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root")
        point = tmp_path / f"mnt{len(mounted)}"
        point.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "healthgate-test", str(point)],
                              capture_output=True, text=True, timeout=10)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in reversed(mounted):
        subprocess.run(["umount", "-l", str(point)], capture_output=True, timeout=10)


def remount(point: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(point)], check=True, timeout=10)


async def test_read_only_mount_fails(tmpfs) -> None:
    """A filesystem remounted read-only fails the check with reason `read-only filesystem`, and passes again rw."""
    point = tmpfs()
    cfg = check(type="disk", path=str(point), min_free_percent=1)
    assert (await sample(cfg)).ok
    remount(point, "ro")
    r = await sample(cfg)
    assert (r.ok, r.kind, r.reason) == (False, "read_only", f"disk {point}: read-only filesystem")
    assert r.observation.value > 99  # still reports what it saw
    assert (await sample(check(type="disk", path=str(point), fail_read_only=False))).ok
    remount(point, "rw")
    assert (await sample(cfg)).ok


async def test_read_only_bind_mount_passes(tmpfs) -> None:
    """A mount that is read-only only in this view (a read-only bind mount, as ProtectSystem= makes) of a
    writable filesystem passes and says so; the filesystem itself going read-only still fails."""
    point = tmpfs()
    cfg = check(type="disk", path=str(point), min_free_percent=1)
    remount(point, "bind,ro")
    r = await sample(cfg)
    assert r.ok, r.reason
    assert r.observation.detail.endswith("; mounted read-only for this agent, the filesystem is writable")
    remount(point, "ro")
    r = await sample(cfg)
    assert (r.ok, r.kind, r.reason) == (False, "read_only", f"disk {point}: read-only filesystem")


async def test_read_only_with_mountinfo_unreadable_fails(tmpfs, tmp_path: Path) -> None:
    """When the mount table cannot be read, a read-only mount counts as a read-only filesystem (fail closed)."""
    point = tmpfs()
    remount(point, "bind,ro")
    r = await sample(check(type="disk", path=str(point)), Context(proc=tmp_path / "noproc"))
    assert (r.ok, r.kind) == (False, "read_only")
    assert r.reason == (f"disk {point}: read-only filesystem (cannot read {tmp_path}/noproc/self/mountinfo: "
                        "No such file or directory, so it counts as the filesystem)")


MOUNTINFO = Path(__file__).parent / "data" / "mountinfo"


@pytest.mark.parametrize(("table", "path", "point", "mount_ro", "super_ro"), [
    # systemd's ProtectSystem=strict: / is a read-only bind mount of a writable ext4
    ("protect-system-strict", "/", "/", True, False),
    ("protect-system-strict", "/usr/lib/x", "/", True, False),
    # the StateDirectory= bind mount is writable (DynamicUser's /var/lib/healthgate resolves to it); the
    # longest point above the path wins, and only at a path boundary
    ("protect-system-strict", "/var/lib/private/healthgate/state.json", "/var/lib/private/healthgate", False,
     False),
    ("protect-system-strict", "/var/lib/private/healthgatex", "/var/lib/private", True, False),
    ("protect-system-strict", "/var/lib/privatex", "/", True, False),
    # octal escapes in mount points are decoded
    ("protect-system-strict", "/srv/data files/a", "/srv/data files", True, False),
    # a filesystem the kernel remounted read-only after an error: the superblock says ro
    ("protect-system-strict", "/var/log/syslog", "/var/log", True, True),
    # a later mount on the same point hides the earlier one (PrivateTmp= mounts its own /tmp over /tmp)
    ("overmounted", "/data", "/data", False, False),
    ("overmounted", "/data/x", "/data", False, False),
])
def test_mount_of_reads_the_view_and_the_filesystem(table, path, point, mount_ro, super_ro) -> None:
    """The mount holding a path is the longest mount point above it (the last listed of equals), with its
    own read-only flag and its filesystem's, as /proc/self/mountinfo lists them."""
    m = mount_of(parse_mountinfo((MOUNTINFO / table).read_text()), path)
    assert m is not None
    assert (m.point, "ro" in m.options, "ro" in m.super_options) == (point, mount_ro, super_ro)


async def test_full_disk_fails_on_percent_and_bytes(tmpfs) -> None:
    """A filled filesystem fails min_free_percent and min_free_bytes, naming what is left."""
    point = tmpfs("size=4m")
    (point / "fill").write_bytes(b"\0" * (3 * 1024 * 1024 + 512 * 1024))  # 3.5 of 4 MiB
    r = await sample(check(type="disk", path=str(point), min_free_percent=20))
    assert (r.ok, r.kind, r.reason) == (False, "threshold", f"disk {point}: 12.5% free < 20%")
    r = await sample(check(type="disk", path=str(point), min_free_percent=10, min_free_bytes="1MiB"))
    assert (r.ok, r.reason) == (False, f"disk {point}: 512.0 KiB free < 1.0 MiB")
    assert (await sample(check(type="disk", path=str(point), min_free_percent=10, min_free_bytes="512KiB"))).ok


async def test_inodes_exhausted_fails(tmpfs) -> None:
    """A filesystem running out of inodes fails min_free_inodes_percent while bytes are plentiful."""
    point = tmpfs("size=4m,nr_inodes=20")
    for i in range(18):
        (point / str(i)).touch()
    r = await sample(check(type="disk", path=str(point), min_free_inodes_percent=20))
    assert (r.ok, r.kind) == (False, "threshold")
    assert r.reason == f"disk {point}: 5.0% inodes free < 20%"


async def test_missing_path_fails() -> None:
    """A path that does not exist fails with the OS's words."""
    r = await sample(check(type="disk", path="/nonexistent/healthgate"))
    assert (r.ok, r.reason) == (False, "disk /nonexistent/healthgate: No such file or directory")


async def test_stuck_blocking_call_is_contained() -> None:
    """A call stuck in the kernel times out once, then fails at once while stuck, and recovers after."""
    release = threading.Event()
    module = types.ModuleType("stuck")
    module.Config = PROBES["disk"].Config

    async def probe(cfg, ctx):
        await blocking(ctx, cfg.name, f"disk {cfg.path}", release.wait)
        return await PROBES["disk"].probe(cfg, ctx)

    module.probe = probe
    runner = Runner(Context(), {**PROBES, "disk": module})
    cfg = check(type="disk", path="/", min_free_percent=0, timeout=0.2, interval=1)
    first = await runner.run(cfg)
    assert (first.ok, first.kind) == (False, "timeout")
    await async_wait_for(lambda: _true(not runner.hung), timeout=2, what="the cancelled probe to end")
    second = await runner.run(cfg)
    assert (second.ok, second.kind) == (False, "hung")
    assert second.reason.startswith("disk /: the read started ") and "s ago is still blocked" in second.reason
    assert second.duration < 0.05  # no second thread, no second wait
    release.set()
    await async_wait_for(lambda: _ok(runner, cfg), timeout=2, what="the check to pass once unstuck")


async def _true(value: bool) -> bool:
    return value


async def _ok(runner: Runner, cfg) -> bool:
    return (await runner.run(cfg)).ok

"""The shipped unit under a real systemd as PID 1: a container booted, the project installed as the docs say."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.config import load_config
from tests.docs import block, page, section
from tests.helpers import REQUIRE_E2E, ROOT, require

pytestmark = [pytest.mark.systemd_boot, pytest.mark.e2e]

# The container's tree: a minimal Debian with what the documented commands and this test need. It is
# built once per recipe and kept outside the checkout; changing the recipe changes the key, so the
# next run builds a new tree (and removes the old one).
SUITE = "bookworm"
PACKAGES = ("systemd", "systemd-sysv", "dbus", "python3", "python3-venv", "procps", "curl")
RECIPE = f"debootstrap --variant=minbase --include={','.join(PACKAGES)} {SUITE}"
CACHE = Path(os.environ.get("HEALTHGATE_SYSTEMD_TREE_CACHE", "/var/cache/healthgate-systemd-test"))
TREE = CACHE / f"{SUITE}-{hashlib.sha256(RECIPE.encode()).hexdigest()[:12]}"

CONTAINER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CHECKOUT = "/root/healthgate"  # where the documented commands run, as from a checkout
CONFIG = "/etc/healthgate/healthgate.toml"
URL = "http://127.0.0.1:8080"  # the default config's listener, inside the container's own network
ADMIN_SOCKET = "/var/lib/healthgate/healthgate.sock"  # StateDirectory=healthgate: the default admin socket
DEFAULT = load_config(ROOT / "config" / "healthgate.toml")

# What a caller's pip needs to reach its index (a proxy, a mirror, a CA) is passed to the install.
PIP_ENV = re.compile(r"^(PIP_\w+|SSL_CERT_FILE|REQUESTS_CA_BUNDLE|(https?|no)_proxy|(HTTPS?|NO)_PROXY)$")
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


# Where the commands this test runs are documented: the page and its section.
INSTALL = ("README.md", "Install")
SYSTEMD = ("docs/systemd.md", "systemd")


def doc_block(where: tuple[str, str], lang: str) -> str:
    """The first ```lang block of a page's section."""
    name, title = where
    return block(section(page(name), title), lang)


def doc_commands(where: tuple[str, str]) -> list[str]:
    """The lines of the first ```sh block of a page's section."""
    return [line for line in doc_block(where, "sh").splitlines() if line.strip()]


def build_tree() -> Path:
    """The cached tree for this recipe, built with debootstrap when missing (about 2 minutes)."""
    debootstrap = require("debootstrap", "debootstrap")
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two runs on one machine build it once
        if (TREE / ".complete").exists():
            return TREE
        for old in CACHE.glob(f"{SUITE}-*"):  # other recipes' trees, and a build that was cut short
            shutil.rmtree(old, ignore_errors=True)
        partial = TREE.with_name(TREE.name + ".partial")
        mirror = [os.environ["HEALTHGATE_DEBIAN_MIRROR"]] if os.environ.get("HEALTHGATE_DEBIAN_MIRROR") else []
        started = time.monotonic()
        proc = subprocess.run([debootstrap, "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE,
                               str(partial), *mirror], capture_output=True, text=True, timeout=1200)
        assert proc.returncode == 0, f"debootstrap failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        # Each boot gets a machine id of its own (systemd makes a transient one for an empty file).
        (partial / "etc" / "machine-id").write_text("")
        (partial / ".complete").write_text(f"{RECIPE}\nbuilt in {time.monotonic() - started:.0f}s\n")
        partial.rename(TREE)
        return TREE


@dataclass
class Poll:
    """One answer seen by the in-container poller: when, the /health status (0: none), the unit's MainPID."""

    t: float
    code: int
    pid: int


class Machine:
    """A booted container: commands run inside it through nsenter, with the container's environment."""

    def __init__(self, leader: int, root: Path):
        self.leader = leader
        self.root = root  # the container's / as the host sees it
        self.timings: dict[str, float] = {}

    def argv(self, script: str, network: bool = True) -> list[str]:
        # Without the network namespace the command has the host's network: only the install needs it
        # (pip reaches the package index); everything else talks to the agent on the container's loopback.
        spaces = ["-a"] if network else ["-m", "-u", "-i", "-p", "-C", "-r", "-w"]
        return ["nsenter", "-t", str(self.leader), *spaces, "/usr/bin/env", "-i", f"PATH={CONTAINER_PATH}",
                "HOME=/root", "LANG=C.UTF-8", *self.pip_env(network), "/bin/sh", "-c", script]

    @staticmethod
    def pip_env(network: bool) -> list[str]:
        return [] if network else [f"{k}={v}" for k, v in os.environ.items() if PIP_ENV.match(k)]

    def sh(self, script: str, timeout: float = 60, check: bool = True, network: bool = True) -> str:
        proc = subprocess.run(self.argv(script, network), capture_output=True, text=True, timeout=timeout)
        if check:
            assert proc.returncode == 0, f"{script!r} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
        return proc.stdout

    def show(self, *props: str) -> dict[str, str]:
        out = self.sh(f"systemctl show healthgate -p {','.join(props)}")
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def get(self, path: str, socket: bool = False) -> tuple[int, str]:
        """GET over TCP, or over the agent's admin socket (the operators' channel: details without a token,
        since TCP loopback is as untrusted as any other network client)."""
        via = f"--unix-socket {ADMIN_SOCKET} http://localhost" if socket else URL
        out = self.sh(f"curl -s --max-time 2 -w '\\n%{{http_code}}' {via}{path}", check=False)
        body, _, code = out.rpartition("\n")
        return int(code or 0), body

    def wait(self, pred, timeout: float, what: str):
        """Poll `pred` until truthy; fail at the deadline with the unit's journal."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            try:
                last = pred()
            except (ValueError, KeyError, IndexError) as e:  # an agent not answering yet, or not fully
                last = e
            if last and not isinstance(last, Exception):
                return last
            time.sleep(0.2)
        pytest.fail(f"timed out after {timeout}s waiting for {what}: last={last!r}\n{self.journal()}")

    def journal(self) -> str:
        return self.sh("journalctl -u healthgate --no-pager -o short-monotonic | tail -n 40", check=False)

    def use_config(self, text: str) -> None:
        """Put `text` in the config file, restart the unit and wait until it is UP."""
        (self.root / CONFIG.lstrip("/")).write_text(text)
        self.sh("systemctl restart healthgate", timeout=60)
        self.wait(lambda: self.get("/health")[0] == 200, 60, "/health 200 after a restart")

    @contextlib.contextmanager
    def poller(self) -> Iterator[Iterator[Poll]]:
        """Answers of /health, as fast as curl goes, with the unit's MainPID beside each, read live."""
        script = ("while :; do c=$(curl -s -o /dev/null -w '%{http_code}' --max-time 0.5 " + URL + "/health); "
                  "echo \"$(date +%s.%N) $c $(systemctl show -p MainPID --value healthgate)\"; done")
        proc = subprocess.Popen(self.argv(script), stdout=subprocess.PIPE, text=True)
        try:
            yield (Poll(float(t), int(c), int(p)) for t, c, p in (line.split() for line in proc.stdout))
        finally:
            proc.kill()
            proc.wait(10)


def find_leader(nspawn: subprocess.Popen, timeout: float = 60) -> int:
    """The container's PID 1, as a host pid: a descendant of nspawn that is pid 1 in its own namespace."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert nspawn.poll() is None, "systemd-nspawn exited during boot"
        for status in Path("/proc").glob("[0-9]*/status"):
            with contextlib.suppress(OSError):
                fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
                if fields.get("NSpid", "").split()[-1:] == ["1"] and _descends(int(status.parent.name), nspawn.pid):
                    return int(status.parent.name)
        time.sleep(0.1)
    pytest.fail("the container's init never appeared")


def _descends(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        stat = Path(f"/proc/{pid}/stat").read_text()
        pid = int(stat.rsplit(")", 1)[1].split()[1])
    return False


@pytest.fixture(scope="module")
def machine(tmp_path_factory) -> Iterator[Machine]:
    """A container booted with systemd as PID 1, the project and the unit installed as the docs say."""
    nspawn = require("systemd-nspawn", "systemd-container")
    require("nsenter", "util-linux")
    if os.geteuid() != 0:
        msg = "booting a container needs root"
        if REQUIRE_E2E:
            pytest.fail(msg + " (HEALTHGATE_REQUIRE_E2E=1)")
        pytest.skip(msg)
    started = time.monotonic()
    tree = build_tree()
    built = time.monotonic() - started
    # The cached tree stays untouched: the container writes to an overlay that lives as long as the test.
    base = tmp_path_factory.mktemp("systemd-boot")
    upper, work, root = base / "upper", base / "work", base / "root"
    for d in (upper, work, root):
        d.mkdir()
    mounted = subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                              f"lowerdir={tree},upperdir={upper},workdir={work}", str(root)],
                             capture_output=True, text=True, timeout=30)
    if mounted.returncode != 0:  # no overlayfs here (its upper cannot be an overlay itself): a copy then
        subprocess.run(["cp", "-a", "--reflink=auto", f"{tree}/.", str(root)], check=True, timeout=600)
    pip_cache = CACHE / "pip"
    pip_cache.mkdir(exist_ok=True)
    shutil.copytree(ROOT, root / CHECKOUT.lstrip("/"), ignore=shutil.ignore_patterns(
        ".venv", ".git", "__pycache__", "*.egg-info", "build", "artifacts", ".*_cache", ".hypothesis"))
    if CA_BUNDLE.exists():  # pip in the container trusts what this machine trusts (a proxy's CA, say)
        (root / "etc/ssl/certs").mkdir(parents=True, exist_ok=True)
        shutil.copy(CA_BUNDLE, root / CA_BUNDLE.relative_to("/"))
    log = open(base / "nspawn.log", "wb")  # noqa: SIM115 - closed at teardown
    boot = subprocess.Popen(
        [nspawn, "--boot", "--register=no", "--keep-unit", "--private-network", "--console=pipe",
         f"--machine=healthgate-test-{os.getpid()}", f"--directory={root}", f"--bind={pip_cache}:/root/.cache/pip"],
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    try:
        m = Machine(find_leader(boot), root)
        m.wait(lambda: m.sh("systemctl is-system-running", check=False).strip() in ("running", "degraded"),
               120, "the container's boot to finish")
        booted = time.monotonic() - started - built
        install, unit = doc_commands(INSTALL), doc_commands(SYSTEMD)
        m.sh(f"set -e; cd {CHECKOUT}; " + "; ".join(install), timeout=600, network=False)
        m.sh(f"set -e; cd {CHECKOUT}; " + "; ".join(x for x in unit if not x.startswith("systemctl reload")),
             timeout=120)
        m.timings = {"tree": built, "boot": booted, "install": time.monotonic() - started - built - booted}
        yield m
    finally:
        boot.send_signal(signal.SIGTERM)  # nspawn powers the container off cleanly
        try:
            boot.wait(60)
        except subprocess.TimeoutExpired:
            boot.kill()
            boot.wait(10)
        log.close()
        subprocess.run(["umount", "-l", str(root)], capture_output=True, timeout=30)


def test_default_config_goes_up(machine: Machine) -> None:
    """Installed and enabled as the docs say, the shipped unit with the shipped config is active and UP,
    its disk check passing on a / that ProtectSystem=strict made read-only for the agent only."""
    props = machine.show("ActiveState", "SubState", "Type")
    assert props == {"ActiveState": "active", "SubState": "running", "Type": "notify"}, props
    machine.wait(lambda: machine.get("/health")[0] == 200, 30, "/health 200")
    status = json.loads(machine.get("/status", socket=True)[1])
    disk = status["checks"]["root-disk:disk"][0]
    assert disk["status"] == "pass"
    assert disk["detail"].endswith("mounted read-only for this agent, the filesystem is writable"), disk
    print(f"timings: {', '.join(f'{k} {v:.0f}s' for k, v in machine.timings.items())}")


def test_exposure_at_most_2(machine: Machine) -> None:
    """`systemd-analyze security` under the running systemd rates the loaded unit's exposure 2.0 or less."""
    out = machine.sh("systemd-analyze security --no-pager healthgate.service", check=False)
    m = re.search(r"Overall exposure level for healthgate\.service: (\d+\.\d+)", out)
    assert m, out
    print(f"exposure {m[1]}")
    assert float(m[1]) <= 2.0, out


CATALOGUE = """
[server]
listen = "0.0.0.0:8080"
shutdown_drain = "5s"
[[checks]]
name = "root-disk"
type = "disk"
path = "/"
min_free_percent = 1
[[checks]]
name = "state-disk"
type = "disk"
path = "/var/lib/healthgate"
min_free_percent = 1
[[checks]]
name = "accept-queue"
type = "listen_queue"
port = 8080
max_drops_per_second = 1000
[[checks]]
name = "journald"
type = "process"
process_name = "systemd-journal"
[[checks]]
name = "file-handles"
type = "fds"
[[checks]]
name = "command"
type = "exec"
command = ["/usr/bin/test", "-d", "/var/lib/healthgate"]
[[checks]]
name = "cpu-pressure"
type = "pressure"
resource = "cpu"
max_avg300 = 100
[[checks]]
name = "memory"
type = "memory"
max_used_percent = 99
[[checks]]
name = "swap"
type = "swap"
max_used_percent = 100
[[checks]]
name = "load"
type = "load"
max_per_cpu = 1000
[[checks]]
name = "cpu"
type = "cpu"
max_percent = 100
[[checks]]
name = "heartbeat"
type = "file"
path = "/run/app/heartbeat"
max_age = "1h"
contains = "serving"
[[checks]]
name = "self-tcp"
type = "tcp"
port = 8080
[[checks]]
name = "self-http"
type = "http"
url = "http://127.0.0.1:8080/live"
"""


def test_node_check_catalogue_passes(machine: Machine) -> None:
    """Under the shipped unit every node check type passes on a healthy node: disk (on / and the state
    directory), listen_queue, process, fds, exec, pressure, memory, swap, load, cpu, file, tcp and http."""
    machine.sh("mkdir -p /run/app && echo serving > /run/app/heartbeat")
    (machine.root / CONFIG.lstrip("/")).write_text(CATALOGUE)
    machine.sh("systemctl restart healthgate", timeout=60)

    def every_check_passes() -> bool | str:
        status = json.loads(machine.get("/status", socket=True)[1] or "{}")
        checks = {k: v[0] for k, v in status.get("checks", {}).items()}
        failing = {k: c.get("output") for k, c in checks.items() if c["status"] != "pass"}
        return status.get("status") == "pass" and len(checks) == CATALOGUE.count("[[checks]]") or str(failing)

    machine.wait(every_check_passes, 60, "every check of the catalogue to pass")


def test_fds_drop_in_counts_another_users_fds(machine: Machine) -> None:
    """docs/systemd.md's drop-in lets an fds check count a root process's fds (refused without it), and the
    unit's exposure stays at most 2.0 with it."""
    check = '[[checks]]\nname = "journald-fds"\ntype = "fds"\nprocess_name = "systemd-journal"\n'
    config = (ROOT / "config" / "healthgate.toml").read_text() + check

    def fds_check() -> dict:
        return json.loads(machine.get("/status", socket=True)[1])["checks"]["journald-fds:fds"][0]

    (machine.root / CONFIG.lstrip("/")).write_text(config)
    machine.sh("systemctl restart healthgate", timeout=60)
    refused = machine.wait(lambda: (c := fds_check())["consecutiveFailures"] and c, 30, "the fds check to fail")
    assert "permission denied reading /proc/" in refused["output"], refused
    drop_in = machine.root / "etc/systemd/system/healthgate.service.d/override.conf"
    drop_in.parent.mkdir(parents=True, exist_ok=True)
    drop_in.write_text(doc_block(SYSTEMD, "ini"))
    try:
        machine.sh("systemctl daemon-reload")
        machine.use_config(config)
        assert fds_check()["status"] == "pass"
        m = re.search(r"exposure level for healthgate\.service: (\d+\.\d+)",
                      machine.sh("systemd-analyze security --no-pager healthgate.service", check=False))
        assert m and float(m[1]) <= 2.0, m
        print(f"exposure with the fds drop-in {m[1]}")
    finally:
        drop_in.unlink()
        machine.sh("systemctl daemon-reload")


def test_watchdog_restarts_a_stopped_agent(machine: Machine) -> None:
    """A SIGSTOPped agent is never 200 while stopped; the watchdog kills it and systemd starts a new one,
    which goes UP."""
    machine.use_config((ROOT / "config" / "healthgate.toml").read_text())
    before = machine.show("MainPID", "NRestarts")
    stopped = int(before["MainPID"])
    machine.sh(f"kill -STOP {stopped}")
    deadline = time.monotonic() + 60
    seen: list[Poll] = []
    with machine.poller() as polls:
        for p in polls:
            seen.append(p)
            if p.pid not in (stopped, 0) and p.code == 200 or time.monotonic() > deadline:
                break
    assert seen[-1].code == 200 and seen[-1].pid != stopped, f"no new agent UP within 60s: {seen[-5:]}"
    while_stopped = [p for p in seen if p.pid == stopped]
    assert while_stopped and all(p.code != 200 for p in while_stopped), while_stopped
    after = machine.show("MainPID", "NRestarts")
    assert int(after["NRestarts"]) == int(before["NRestarts"]) + 1, (before, after)
    assert "Watchdog timeout" in machine.journal()
    # The poller's own clock (the container's date) times the answers, so these differences are its.
    replaced = next(p.t for p in seen if p.pid != stopped) - seen[0].t
    print(f"watchdog: a new agent {replaced:.1f}s after SIGSTOP, UP {seen[-1].t - seen[0].t:.1f}s after it")


def test_reload_with_a_broken_config_keeps_serving(machine: Machine) -> None:
    """`systemctl reload` with a config that does not parse is refused: the same agent keeps serving 200."""
    machine.use_config((ROOT / "config" / "healthgate.toml").read_text())
    pid = machine.show("MainPID")["MainPID"]

    def failures() -> float:
        m = re.search(r"^healthgate_config_reload_failures_total (\S+)$", machine.get("/metrics")[1], re.M)
        return float(m[1]) if m else -1.0

    refused = failures()
    assert refused >= 0
    (machine.root / CONFIG.lstrip("/")).write_text("[server\nlisten = \n")
    reload = next(x for x in doc_commands(SYSTEMD) if x.startswith("systemctl reload"))
    machine.sh(reload)
    codes = []

    def refusal_counted() -> bool:
        codes.append(machine.get("/health")[0])
        return failures() == refused + 1

    machine.wait(refusal_counted, 20, "the refused reload to be counted")
    codes += [machine.get("/health")[0] for _ in range(10)]
    assert set(codes) == {200}, codes
    assert machine.show("MainPID", "ActiveState") == {"MainPID": pid, "ActiveState": "active"}


def test_stop_drains_then_exits_0(machine: Machine) -> None:
    """`systemctl stop` serves 503 for shutdown_drain, then the agent exits 0 and the unit ends with
    Result=success."""
    machine.use_config((ROOT / "config" / "healthgate.toml").read_text())
    seen: list[Poll] = []
    stop: subprocess.Popen | None = None
    start = 0  # the first answer after `systemctl stop` was run
    deadline = time.monotonic() + 60
    with machine.poller() as polls:
        for p in polls:
            seen.append(p)
            if stop is None and p.code == 200:
                stop = subprocess.Popen(machine.argv("systemctl stop healthgate"), stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True)
                start = len(seen)
            elif stop is not None and (p.pid == 0 and stop.poll() is not None or time.monotonic() > deadline):
                break
    assert stop is not None
    out, _ = stop.communicate(timeout=30)
    assert stop.returncode == 0, out
    after = seen[start:]
    drained = [p for p in after if p.code == 503]
    assert drained, after
    first = after.index(drained[0])
    assert all(p.code != 200 for p in after[first:]), after  # never UP again once draining
    span = drained[-1].t - drained[0].t
    assert span >= DEFAULT.server.shutdown_drain - 0.5, f"503 for only {span:.1f}s: {after}"
    props = machine.show("ActiveState", "Result", "ExecMainCode", "ExecMainStatus")
    assert props == {"ActiveState": "inactive", "Result": "success", "ExecMainCode": "1", "ExecMainStatus": "0"}, (
        props, machine.journal())
    print(f"stop: 503 for {span:.1f}s (shutdown_drain {DEFAULT.server.shutdown_drain:g}s), then exit 0")

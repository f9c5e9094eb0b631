"""The README's quick start and the docs' tables hold against the code: documentation that drifts fails here."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import tomllib
from pathlib import Path

import pytest

from agent.config import load_config, parse_config
from tests.docs import page, section
from tests.helpers import ROOT, agent_toml, free_port, http_get, memory_check, toml_table, wait_for


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


def test_every_exported_metric_is_in_the_metrics_table(agent_process, dependency, tmp_path: Path) -> None:
    """Every metric family a running agent exports (fleet guard off; verdict groups, the agent-check and
    several check types on, one of them failing) is named in the metrics table of docs/prometheus.md."""
    beat = tmp_path / "beat"
    beat.write_text("ok")
    config = agent_toml() + toml_table("[agent_check]", listen="127.0.0.1:0") + memory_check() + "".join(
        toml_table("[[checks]]", **{"interval": "200ms", "timeout": "150ms", "rise": 1, "fall": 1, **check})
        for check in (
            {"name": "disk", "type": "disk", "path": "/", "min_free_percent": 0},
            {"name": "db", "type": "tcp", "port": dependency.port},
            {"name": "gone", "type": "tcp", "port": free_port(), "critical": False},
            {"name": "plugin", "type": "exec", "command": ["true"]},
            {"name": "beat", "type": "file", "path": str(beat)},
            {"name": "load", "type": "load", "max_per_cpu": 1000},
        )) + toml_table("[groups.api]", checks=["db"])
    agent = agent_process(config)
    wait_for(lambda: 'reason="refused"' in agent.get("/metrics")[1], what="a failure counted")
    body = agent.get("/metrics")[1]
    families = dict(line.split()[2:4] for line in body.splitlines() if line.startswith("# TYPE "))
    assert "healthgate_up_since_timestamp_seconds" in families and "healthgate_group_up" in families
    table = section(page("docs/prometheus.md"), "Metrics")
    # A counter's TYPE line names it with or without _total, depending on the client library's version.
    missing = [name for name, kind in families.items()
               if not (name.startswith("process_") and "`process_*`" in table)
               and not re.search(rf"`{name.removesuffix('_total')}{'_total' if kind == 'counter' else ''}(?![a-z_])",
                                 table)]
    assert not missing, f"exported but not in the metrics table of docs/prometheus.md: {missing}"


def test_the_default_config_is_tracked_and_not_ignored() -> None:
    """config/healthgate.toml, which `make run` uses, is part of the checkout and not ignored (a local
    override, config/*.local.toml, is)."""
    if shutil.which("git") is None or subprocess.run(["git", "rev-parse"], cwd=ROOT, capture_output=True).returncode:
        pytest.skip("not a git checkout")

    def git(*args: str) -> int:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True).returncode

    assert git("ls-files", "--error-unmatch", "config/healthgate.toml") == 0
    assert git("check-ignore", "-q", "config/healthgate.toml") == 1
    assert git("check-ignore", "-q", "--no-index", "config/healthgate.local.toml") == 0


def quick_start() -> str:
    readme = (ROOT / "README.md").read_text()
    return readme[readme.index("\n## Quick start\n"):readme.index("\n## Install\n")]


def test_quick_start_commands_parse_and_share_the_run_config() -> None:
    """Every healthgate command of the quick start parses as the command line does, and every one that acts
    on the agent (run, check, status, explain, drain, maint, ready) names the run line's config with -c."""
    from agent.cli.main import build_parser

    lines = [line.split("  #")[0].strip() for block in re.findall(r"```sh\n(.*?)```", quick_start(), re.S)
             for line in block.splitlines() if line.startswith(".venv/bin/healthgate ")]
    commands = {}
    for line in lines:
        argv = shlex.split(line.split(">")[0])[1:]
        args = build_parser().parse_args(argv)  # exits (and fails the test) on a line the parser refuses
        commands[argv[0]] = args
    assert {"run", "check", "status", "explain", "drain", "maint", "ready", "validate", "schema"} <= set(commands)
    config = commands["run"].config
    assert config == "config/healthgate.toml" and (ROOT / config).is_file()
    for name in ("check", "status", "explain", "drain", "maint", "ready"):
        assert commands[name].config == config, name
    assert commands["drain"].duration == 600 and commands["drain"].reason == "deploy 42"


def test_quick_start_says_root_is_refused_before_the_first_command() -> None:
    """The root note comes before `make run`, which a root shell would otherwise try first."""
    text = quick_start()
    assert text.index("refuses to run as root") < text.index("make run     #")


def test_first_config_walkthrough_validates() -> None:
    """The "your first config" example validates, checks an HTTP app, a Redis, a disk and memory, and the
    examples it points to exist and validate too."""
    walkthrough = quick_start()[quick_start().index("### Your first config"):]
    config = parse_config(tomllib.loads(re.search(r"```toml\n(.*?)```", walkthrough, re.S).group(1)))
    assert [c.type for c in config.checks] == ["http", "redis", "disk", "memory"]
    examples = re.findall(r"\]\((config/examples/[a-z]+\.toml)\)", walkthrough)
    assert examples == ["config/examples/node.toml", "config/examples/dependencies.toml"]
    for path in examples:
        load_config(ROOT / path)


NEWCOMER = "healthgate-newcomer"


def _as_newcomer(home: Path, *argv: str, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(_newcomer(home, *argv), capture_output=True, text=True, timeout=timeout, **kw)


def _newcomer(home: Path, *argv: str) -> list[str]:
    """`argv` as the newcomer, at home in `home` (runuser would set HOME to the account's own)."""
    return ["runuser", "-u", NEWCOMER, "--", "env", "-i", f"HOME={home}", "LANG=C.UTF-8",
            f"PATH={os.environ.get('PATH', '/usr/bin:/bin')}", *argv]


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="creating an ordinary user to run the quick start as needs root")
def test_the_quick_start_works_on_a_fresh_clone_as_an_ordinary_user(tmp_path: Path) -> None:
    """The README's quick start pasted as written, on a fresh clone, by an ordinary user: `make run`
    installs and serves, /health turns 200, and the other commands of the quick start work against it
    (drain and ready confirmed by the agent). The one change: the config's port, so that it cannot
    collide with another agent on this machine. The install needs the package index (as a user's does)."""
    for tool in ("make", "git", "runuser", "useradd"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not found")
    if subprocess.run(["id", NEWCOMER], capture_output=True).returncode != 0:
        subprocess.run(["useradd", "--system", "--shell", "/bin/sh", "--no-create-home", NEWCOMER], check=True)
    # Outside pytest's own directory (root's alone): where an ordinary user's home would be.
    home = Path(tempfile.mkdtemp(prefix="healthgate-newcomer-"))
    clone = home / "healthgate"
    subprocess.run(["git", "clone", "--quiet", "--no-hardlinks", str(ROOT), str(clone)], check=True)
    port = free_port()
    cfg = clone / "config" / "healthgate.toml"
    cfg.write_text(cfg.read_text().replace(":8080", f":{port}"))
    subprocess.run(["chown", "-R", f"{NEWCOMER}:", str(home)], check=True)
    run = subprocess.Popen(_newcomer(home, "make", "run"), cwd=clone, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        def up() -> bool:
            assert run.poll() is None, run.stdout.read().decode()
            return http_get(url + "/health", timeout=0.5)[0] == 200

        wait_for(up, timeout=240, interval=0.5, what="make run -> /health 200 (the install included)")
        hg = str(clone / ".venv" / "bin" / "healthgate")
        cmds = [(hg, "check", "-c", "config/healthgate.toml"), (hg, "status", "-c", "config/healthgate.toml"),
                (hg, "explain", "-c", "config/healthgate.toml"),
                (hg, "drain", "-c", "config/healthgate.toml", "--for", "10m", "--reason", "deploy 42"),
                (hg, "ready", "-c", "config/healthgate.toml")]
        for argv in cmds:
            proc = _as_newcomer(home, *argv, cwd=clone, timeout=60)
            assert proc.returncode == 0, (argv, proc.stdout, proc.stderr)
        schema = _as_newcomer(home, hg, "schema", cwd=clone, timeout=60)
        assert schema.returncode == 0 and '"title": "healthgate configuration"' in schema.stdout
    finally:
        os.killpg(run.pid, signal.SIGTERM)
        run.wait(30)
        shutil.rmtree(home, ignore_errors=True)

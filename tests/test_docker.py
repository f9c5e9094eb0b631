"""deploy/docker/Dockerfile without a Docker engine: parsed, matched to the docs, run on a read-only root."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import dockerfile
import pytest

from agent import __version__
from tests.docs import block, page, section
from tests.helpers import ROOT, free_port, http_get, run_argv, wait_for

DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"


@dataclass
class Stage:
    base: str
    name: str | None
    commands: list[dockerfile.Command] = field(default_factory=list)
    user: str = "root"
    env: dict[str, str] = field(default_factory=dict)
    volumes: list[str] = field(default_factory=list)
    tag: str = ""


def stages() -> list[Stage]:
    """The Dockerfile's build stages, parsed by BuildKit's own parser (line continuations, comments)."""
    out: list[Stage] = []
    for cmd in dockerfile.parse_file(str(DOCKERFILE)):
        if cmd.cmd == "FROM":
            base, *rest = cmd.value
            out.append(Stage(base, rest[1] if len(rest) == 2 and rest[0].upper() == "AS" else None))
            continue
        assert out, "the first instruction must be FROM"
        stage = out[-1]
        stage.commands.append(cmd)
        if cmd.cmd == "USER":
            stage.user = cmd.value[0]
        elif cmd.cmd == "ENV":
            stage.env.update(zip(cmd.value[::2], cmd.value[1::2], strict=True))
        elif cmd.cmd == "VOLUME":
            stage.volumes.extend(cmd.value)
    return out


def build_tag() -> str:
    m = re.search(r"docker build -f deploy/docker/Dockerfile -t (\S+) \.", page("docs/kubernetes.md"))
    assert m, "docs/kubernetes.md documents how to build the image"
    return m[1]


def final_stage() -> Stage:
    stage = stages()[-1]
    stage.tag = build_tag()
    return stage


def install_steps() -> list[str]:
    """The commands of the README's install block."""
    lines = block(section(page("README.md"), "Install"), "sh").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def run_steps(stage: Stage) -> list[str]:
    """Every RUN of a stage split into its `&&` steps, whitespace normalised."""
    steps = []
    for cmd in stage.commands:
        if cmd.cmd == "RUN":
            steps += [" ".join(s.split()) for s in cmd.value[0].split("&&")]
    return steps


def test_dockerfile_parses_into_two_slim_python_stages() -> None:
    """The Dockerfile parses; both stages start from a slim Python image of the version the package needs."""
    parsed = stages()
    assert [s.name for s in parsed] == ["build", None]
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    minimum = requires.removeprefix(">=")
    for s in parsed:
        m = re.fullmatch(r"python:(\d+\.\d+)-slim(-\w+)?", s.base)
        assert m, s.base
        assert tuple(map(int, m[1].split("."))) >= tuple(map(int, minimum.split(".")))
    assert parsed[0].base == parsed[1].base, "the venv's interpreter link must resolve in the final stage"


def test_final_user_is_not_root() -> None:
    """The image runs as a numeric, non-zero uid and gid (so runAsNonRoot can verify it)."""
    user = final_stage().user
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0 and gid.isdigit() and int(gid) != 0, user


def test_install_steps_are_the_readmes() -> None:
    """The image installs the package with exactly the steps the README's Install section documents."""
    steps = install_steps()
    assert steps == ["python3 -m venv /opt/healthgate", "/opt/healthgate/bin/pip install ."]
    built = run_steps(stages()[0])
    assert built[: len(steps)] == steps
    copies = [c for c in stages()[1].commands if c.cmd == "COPY"]
    assert any(c.flags == ("--from=build",) and c.value == ("/opt/healthgate", "/opt/healthgate") for c in copies)
    # The systemd unit runs the same installed binary.
    unit = (ROOT / "deploy" / "systemd" / "healthgate.service").read_text()
    assert "ExecStart=/opt/healthgate/bin/healthgate run" in unit


def test_copied_sources_exist_and_pass_the_dockerignore() -> None:
    """Every COPY source exists in the repository and is let through by the Dockerfile's ignore file."""
    allowed = [line[1:].rstrip("/") for line in (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().splitlines()
               if line.startswith("!")]
    for stage in stages():
        for cmd in stage.commands:
            if cmd.cmd != "COPY" or cmd.flags:
                continue
            for src in cmd.value[:-1]:
                assert (ROOT / src).exists(), src
                assert any(src == a or src.startswith(a + "/") for a in allowed), src


def test_image_entrypoint_and_tag() -> None:
    """The image starts `healthgate run` on the bundled config (exec form, so SIGTERM reaches the agent), and
    the tag docs/kubernetes.md builds is the package version the manifests name."""
    stage = final_stage()
    entry = [c for c in stage.commands if c.cmd in ("ENTRYPOINT", "CMD")]
    assert [(c.cmd, c.json, c.value) for c in entry] == [
        ("ENTRYPOINT", True, ("healthgate", "run")), ("CMD", True, ("-c", "/etc/healthgate/healthgate.toml"))]
    assert stage.tag == f"healthgate:{__version__}"
    assert f"-t {stage.tag} ." in DOCKERFILE.read_text()
    assert stage.env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert stage.volumes == [stage.env["STATE_DIRECTORY"]]


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root and unshare")
def test_agent_serves_and_drains_on_a_read_only_root(tmp_path: Path) -> None:
    """With the image's environment, the agent serves and drains cleanly when the whole root filesystem
    is read-only and only its state directory (a tmpfs, like an emptyDir) is writable."""
    stage = final_stage()
    state = tmp_path / "state"
    state.mkdir()
    port = free_port()
    config = tmp_path / "healthgate.toml"
    config.write_text(f"""
[server]
listen = "127.0.0.1:{port}"
shutdown_drain = "200ms"
[agent]
allow_root = true
[[checks]]
name = "state-disk"
type = "disk"
path = "{state}"
interval = "200ms"
timeout = "100ms"
rise = 1
""")
    env = {**os.environ, **{k: v for k, v in stage.env.items() if k != "PATH"}, "STATE_DIRECTORY": str(state)}
    agent = run_argv(config)
    script = (f"mount -o remount,bind,ro / && mount -t tmpfs -o size=1m tmpfs {shlex.quote(str(state))} "
              f"&& exec {shlex.join(agent)}")
    log = tmp_path / "agent.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", script], cwd=ROOT,
                                env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: proc.poll() is not None or http_get(f"http://127.0.0.1:{port}/health")[0] == 200,
                 what="agent up on a read-only root")
        assert proc.poll() is None, log.read_text()
        # The root really is read-only in there: the disk check on / would say so.
        probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                                "mount -o remount,bind,ro / && touch /healthgate-ro-probe"],
                               capture_output=True, text=True)
        assert probe.returncode != 0 and "Read-only file system" in probe.stderr
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert "Traceback" not in text and "Read-only file system" not in text, text
    assert '"event": "stopped"' in text

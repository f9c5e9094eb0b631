"""Section: from a fresh clone to the first /health 200, `make run`'s install included, as a newcomer sees it.

A clone of this checkout in an empty home directory, `make run` as written in the README (as an ordinary
user: as root, one made for it, since the agent refuses root), and GET /health every 100 ms until it
answers 200. The install downloads from the package index with an empty pip cache, so the figure includes
the network: read it as what a new machine sees, not as the agent's own start-up (the Footprint section)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from bench.core import Ctx, Section, Target, table
from bench.parse import Summary
from bench.servers import ROOT, free_port, http_status

USER = "healthgate-newcomer"


def _as_user(home: Path) -> list[str]:
    env = ["env", "-i", f"HOME={home}", "LANG=C.UTF-8", f"PATH={os.environ.get('PATH', '/usr/bin:/bin')}"]
    if os.geteuid() != 0:
        return env
    if subprocess.run(["id", USER], capture_output=True).returncode != 0:
        subprocess.run(["useradd", "--system", "--shell", "/bin/sh", "--no-create-home", USER], check=True)
    return ["runuser", "-u", USER, "--", *env]


def _status(url: str) -> int:
    try:
        return http_status(url, 0.5)
    except OSError:  # not listening yet: the install is still running
        return 0


def once(ctx: Ctx) -> float:
    home = Path(tempfile.mkdtemp(prefix="healthgate-firstrun-"))
    clone = home / "healthgate"
    proc = None
    try:
        t0 = time.monotonic()
        subprocess.run(["git", "clone", "--quiet", "--no-hardlinks", str(ROOT), str(clone)], check=True)
        port = free_port()
        cfg = clone / "config" / "healthgate.toml"
        cfg.write_text(cfg.read_text().replace(":8080", f":{port}"))  # the one change: a free port
        argv = [*_as_user(home), "make", "run"]  # as root: makes the user first, who then owns the home
        if os.geteuid() == 0:
            subprocess.run(["chown", "-R", f"{USER}:", str(home)], check=True)
        proc = subprocess.Popen(argv, cwd=clone, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        while _status(f"http://127.0.0.1:{port}/health") != 200:
            if proc.poll() is not None or time.monotonic() - t0 > 600:
                raise RuntimeError("make run never served 200")
            time.sleep(0.1)
        took = time.monotonic() - t0
        ctx.log(f"firstrun: clone to the first 200 in {took:.1f} s")
        return took
    finally:
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
        shutil.rmtree(home, ignore_errors=True)


def run(ctx: Ctx) -> Section:
    if shutil.which("git") is None or shutil.which("make") is None:
        return Section("From a fresh clone to the first 200", "Not run: git and make are needed.")
    times = [once(ctx) for _ in range(1 if ctx.quick else 2)]
    took = Summary.of(times)
    md = (__doc__.split("\n\n", 1)[1].replace("\n", " ") + "\n\n"
          + table(["runs", "clone to the first /health 200, s"], [[str(len(times)), took.fmt(1, 1)]]))
    return Section("From a fresh clone to the first 200", md,
                   [Target("from a fresh clone to the first /health 200 (make run, install included)", "reported",
                           took.fmt(1, 1, " s"), None, "mostly the package downloads; then `rise` passes")])

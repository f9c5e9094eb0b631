"""exec: a command (an argv list, never a shell) exits 0; Nagios plugin exit codes and output understood."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import re
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from agent.fields import AbsolutePath
from agent.model import Observation
from agent.probes.base import CheckBase, CheckFailed, Context
from agent.probes.blocking import blocking

MAX_OUTPUT = 64 * 1024  # bytes of output kept; the rest is read and thrown away so the command never blocks
NAGIOS = {0: "OK", 1: "WARNING", 2: "CRITICAL", 3: "UNKNOWN"}
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
PERFDATA = re.compile(r"^'?([^'=]+)'?=(-?[0-9.]+(?:[eE][-+]?\d+)?)([a-zA-Z%]*)")
MAX_SERIES = 8
PERF_UNITS = {"": (1, ""), "s": (1, "seconds"), "ms": (1e-3, "seconds"), "us": (1e-6, "seconds"),
              "%": (1, "percent"), "B": (1, "bytes"), "KB": (1024, "bytes"), "MB": (1024**2, "bytes"),
              "GB": (1024**3, "bytes"), "TB": (1024**4, "bytes"), "c": (1, "count")}


class Config(CheckBase):
    type: Literal["exec"]
    command: list[str] = Field(min_length=1, description="argv: the program and its arguments, never a shell")
    warning_is_failure: bool = Field(default=True, description="exit 1 (Nagios WARNING) fails the check")
    env: dict[str, str] = Field(default_factory=dict, description="variables set for the command (secrets)")
    pass_env: list[str] = Field(default_factory=lambda: ["PATH", "LANG", "TZ"],
                                description="variables copied from the agent's environment when set there")
    cwd: AbsolutePath = Field(default="/", description="working directory")
    user: str | None = Field(default=None, min_length=1, description="run as this user (the agent must be root)")

    @field_validator("command", mode="before")
    @classmethod
    def _argv(cls, v: object) -> object:
        if isinstance(v, str):
            raise ValueError('must be a list (argv), never a shell command line: ["/usr/bin/check", "-w", "10"]')
        return v

    @field_validator("command")
    @classmethod
    def _program(cls, v: list[str]) -> list[str]:
        if not v[0]:
            raise ValueError("the program (first item) is empty")
        return v

    @field_validator("env", "pass_env")
    @classmethod
    def _names(cls, v: dict[str, str] | list[str]) -> dict[str, str] | list[str]:
        for name in v:
            if not ENV_NAME.match(name):
                raise ValueError(f"{name!r} is not an environment variable name")
        return v

    def threshold(self) -> str:
        return "exit 0" + ("" if self.warning_is_failure else " or 1 (WARNING)")

    def secrets(self) -> tuple[str, ...]:
        return tuple(v for v in self.env.values() if v)

    def environment(self) -> dict[str, str]:
        env = {k: os.environ[k] for k in self.pass_env if k in os.environ}
        env.update(self.env)
        return env

    def preflight(self, proc: Path = Path("/proc")) -> tuple[str, ...]:
        out = []
        program = self.command[0]
        if not shutil.which(program, path=self.environment().get("PATH", os.defpath)):
            out.append(f"command: {program!r} is not an executable on this host's PATH")
        if not Path(self.cwd).is_dir():
            out.append(f"cwd: {self.cwd} is not a directory on this host")
        if self.user is not None:
            try:
                _lookup(self.user)
            except KeyError:
                out.append(f"user: no user {self.user!r} on this host")
        return tuple(out)


def _lookup(user: str) -> tuple[int, int, list[int]]:
    """(uid, gid, supplementary groups) of a user name or numeric uid; KeyError when unknown. May block (NSS)."""
    entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    return entry.pw_uid, entry.pw_gid, os.getgrouplist(entry.pw_name, entry.pw_gid)


async def _credentials(cfg: Config, ctx: Context) -> dict:
    """Popen keywords that drop to `user`: resolved once, then kept (the lookup may go to LDAP)."""
    if cfg.user is None:
        return {}
    key = ("exec.user", cfg.name, cfg.user)
    if key not in ctx.memo:
        try:
            ctx.memo[key] = await blocking(ctx, cfg.name, "exec", _lookup, cfg.user)
        except KeyError:
            raise CheckFailed(f"exec: no user {cfg.user!r} on this host", "config") from None
    uid, gid, groups = ctx.memo[key]
    if os.geteuid() != 0:
        if uid == os.geteuid():
            return {}
        raise CheckFailed(f"exec: cannot run as {cfg.user!r}: the agent is not root", "config")
    return {"user": uid, "group": gid, "extra_groups": groups}


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


# -- descendants that left the process group ----------------------------------------------------------
#
# A command's process group dies with it, but a descendant that calls setsid (a daemon, `setsid cmd &`)
# is in no group of ours. As a child subreaper the agent adopts every orphan below it instead of init,
# so when a sample ends, whatever is left of its tree has become a child of the agent: adopted, in a
# session other than the agent's, started after the sample's command. Those are killed and reaped.
#
# Children are a property of the process, not of one Context, so the bookkeeping is module-level, and
# only ever touched from the event loop. Only pids that are children of this process are reaped, one
# by one (never waitpid(-1)), so the statuses of asyncio's and subprocess's own children stay theirs.
# asyncio's default child watchers (a thread per child on 3.11, pidfds from 3.12) and uvloop wait for
# their own pids only, so adopted orphans are left for us; a waitpid(-1) watcher (FastChildWatcher)
# would reap them first, and _reap then finds nothing left to collect.
# The agent starts no child in a session of its own besides exec commands; were it to, a child started
# while an exec sample runs would look adopted.

PR_SET_CHILD_SUBREAPER = 36
CLEANUP_DEADLINE = 1.0  # seconds a sample's end spends on its strays; a process stuck in D state stays
_subreaper: bool | None = None
_running: dict[int, int] = {}  # leader pid -> its start time (clock ticks since boot), until reaped
_unreaped: dict[int, int] = {}  # strays killed whose death was not seen before the deadline


def _become_subreaper() -> bool:
    """Make the agent the reaper of orphans below it (Linux 3.4+), once per process."""
    global _subreaper
    if _subreaper is None:
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            _subreaper = libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
        except (OSError, AttributeError):
            _subreaper = False
    return _subreaper


def _stat(pid: int | str) -> tuple[str, int, int, int] | None:
    """(state, ppid, session, start time) of a process, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0].decode(), int(fields[1]), int(fields[3]), int(fields[19])


def _children(pid: int) -> list[int] | None:
    """The children of a process from /proc/PID/task/*/children; None where the kernel lacks that file
    (CONFIG_PROC_CHILDREN). An orphan is adopted by one thread of the agent: every thread is read."""
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []  # gone
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                out += map(int, f.read().split())
        except FileNotFoundError:
            if not os.path.exists(f"/proc/{pid}/task/{tid}"):
                continue  # the thread ended
            return None
        except OSError:
            continue
    return out


def _processes() -> dict[int, list[int]]:
    """ppid -> children of every process on the host: the slow way, for kernels without children files."""
    out: dict[int, list[int]] = {}
    try:
        names = os.listdir("/proc")
    except OSError:  # no /proc: nothing to find
        return out
    for name in names:
        if name.isdigit() and (st := _stat(name)) is not None:
            out.setdefault(st[1], []).append(int(name))
    return out


def _strays(leader: int, started: int) -> dict[int, int]:
    """pid -> start time of what is left of the sample whose command was `leader`: adopted orphans that
    only this sample can have left (no other exec sample running since before they started) and all
    their descendants, plus strays an earlier sample killed but could not reap. Where the kernel lists
    children, only the agent's own tree is read, so the cost does not grow with the host's processes."""
    me, session = os.getpid(), os.getsid(0)
    table = _processes() if _children(me) is None else None

    def children(pid: int) -> list[int]:
        return table.get(pid, []) if table is not None else _children(pid) or []

    for pid, t in list(_unreaped.items()):
        if (st := _stat(pid)) is None or st[3] != t:
            del _unreaped[pid]  # gone, or the pid names another process now
    others = [t for pid, t in _running.items() if pid != leader]
    roots = []
    for pid in children(me):
        if pid in _running or (st := _stat(pid)) is None:
            continue
        if pid in _unreaped:
            if st[0] == "Z":  # retried only once dead: a live one is beyond our reach
                roots.append(pid)
        elif st[2] != session and st[3] >= started and not any(o <= st[3] for o in others):
            roots.append(pid)
    out: dict[int, int] = {}
    while roots:
        pid = roots.pop()
        if pid in out or (st := _stat(pid)) is None:
            continue
        out[pid] = st[3]
        roots += children(pid)
    return out


def _kill(pid: int, started: int) -> int | None:
    """SIGKILL the process `pid` if it is still the one that started at `started`; its pidfd, to wait on."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:  # gone, or Linux before 5.3: check, then signal by pid (a reuse in between is unlikely)
        st = _stat(pid)
        if st is not None and st[3] == started:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        return None
    st = _stat(pid)  # read after pidfd_open: the pidfd pins the process this start time names
    if st is None or st[3] != started:
        os.close(fd)
        return None
    try:
        signal.pidfd_send_signal(fd, signal.SIGKILL)
    except PermissionError:  # a set-uid program below an unprivileged agent: nothing to wait for
        os.close(fd)
        return None
    except ProcessLookupError:
        pass  # it has exited: the pidfd is readable at once
    return fd


def _resolve(done: asyncio.Future[None]) -> None:
    """A pidfd reader's callback: it may fire again before the reader is removed, so only the first counts."""
    if not done.done():
        done.set_result(None)


async def _readable(fds: list[int], within: float) -> None:
    """Until every pidfd is readable (its process exited), for `within` seconds at most."""
    loop = asyncio.get_running_loop()
    futures = []
    for fd in fds:
        done = loop.create_future()
        loop.add_reader(fd, _resolve, done)
        futures.append(done)
    try:
        await asyncio.wait(futures, timeout=within)
    finally:
        for fd in fds:
            loop.remove_reader(fd)


def _reap(pid: int) -> bool:
    """Collect a dead child's status; True once nothing is left to collect."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:  # not our child, or someone else's waitpid(-1) took it
        return True
    return done != 0


async def _kill_strays(leader: int, started: int) -> None:
    """Kill and reap what is left of a sample, generation by generation (a killed parent's children are
    adopted in turn), until nothing is left or the deadline passes."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + CLEANUP_DEADLINE
    me = os.getpid()
    while strays := _strays(leader, started):
        fds = [fd for pid, t in strays.items() if (fd := _kill(pid, t)) is not None]
        try:
            if fds:
                await _readable(fds, max(0.0, deadline - loop.time()))
            else:
                await asyncio.sleep(0.05)  # nothing to wait on: look again shortly
        finally:
            for fd in fds:
                os.close(fd)
        for pid, t in strays.items():
            st = _stat(pid)
            if st is not None and st[1] == me and not _reap(pid):
                _unreaped[pid] = t
            else:
                _unreaped.pop(pid, None)
        if loop.time() >= deadline:
            return


async def _exited(proc: subprocess.Popen) -> int:
    """Wait for the child without blocking the loop: a pidfd turns readable when it exits."""
    loop = asyncio.get_running_loop()
    try:
        fd = os.pidfd_open(proc.pid)
    except OSError:  # Linux before 5.3: poll
        while proc.poll() is None:  # noqa: ASYNC110 - nothing to wait on but the clock
            await asyncio.sleep(0.02)
        return proc.returncode
    try:
        done = loop.create_future()
        loop.add_reader(fd, _resolve, done)
        try:
            await done
        finally:
            loop.remove_reader(fd)
    finally:
        os.close(fd)
    return proc.wait()  # it has exited: this only reaps


async def _read_capped(proc: subprocess.Popen) -> tuple[bytes, int]:
    """Output up to MAX_OUTPUT bytes, and how many more were thrown away; returns at EOF."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=MAX_OUTPUT, loop=loop)
    transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), proc.stdout)
    kept = bytearray()
    dropped = 0
    try:
        while chunk := await reader.read(MAX_OUTPUT):
            room = MAX_OUTPUT - len(kept)
            kept += chunk[:room]
            dropped += max(0, len(chunk) - room)
    finally:
        transport.close()
    return bytes(kept), dropped


def _perfdata(text: str) -> tuple[tuple[str, float, str], ...]:
    """Nagios performance data (`OK - 3 users | users=3;5;10 load=0.2`) as observation series."""
    _, bar, perf = text.partition("|")
    if not bar:
        return ()
    out = []
    for item in perf.split()[:MAX_SERIES]:
        m = PERFDATA.match(item)
        if m and m.group(3) in PERF_UNITS:
            name = re.sub(r"[^A-Za-z0-9_]", "_", m.group(1)).strip("_")[:40] or "value"
            scale, unit = PERF_UNITS[m.group(3)]
            with contextlib.suppress(ValueError):
                out.append((name, float(m.group(2)) * scale, unit))
    return tuple(out)


async def probe(cfg: Config, ctx: Context) -> Observation:
    program = os.path.basename(cfg.command[0])
    credentials = await _credentials(cfg, ctx)
    _become_subreaper()
    try:
        # Popen, not asyncio's subprocess API: it drops privileges without preexec_fn under any event
        # loop (uvloop rejects user=/group=). Forking takes about a millisecond on the loop.
        proc = subprocess.Popen(  # noqa: ASYNC220 - only fork+exec happen here; the waiting is async
            cfg.command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            cwd=cfg.cwd, env=cfg.environment(), start_new_session=True, close_fds=True, **credentials,
        )
    except FileNotFoundError as e:
        where = "cwd" if e.filename == cfg.cwd else "command"
        raise CheckFailed(f"exec {program}: {where} {e.filename}: no such file or directory", "config") from None
    except PermissionError as e:
        raise CheckFailed(f"exec {program}: {e.filename}: permission denied", "config") from None
    except OSError as e:
        raise CheckFailed(f"exec {program}: cannot start: {e.strerror or e}", "error") from None
    leader = _stat(proc.pid)
    started = _running[proc.pid] = leader[3] if leader else 0
    try:
        # start_new_session made the command a process group leader (pgid == pid). On the way out,
        # normally or when the runner cancels us at the timeout, the whole group is killed, then what
        # left the group (see _strays), so neither the command nor anything it forked outlives the sample.
        output, dropped = await _read_capped(proc)
        code = await _exited(proc)
    finally:
        try:
            _kill_group(proc.pid)
            if proc.poll() is None:
                await _exited(proc)
            await _kill_strays(proc.pid, started)
        finally:
            if _running.get(proc.pid) == started:  # the pid is free once reaped: it may be a new sample's
                del _running[proc.pid]
            if proc.stdout is not None:  # always a pipe: Popen was asked for one
                proc.stdout.close()

    text = output.decode(errors="replace")
    first = text.strip().split("\n", 1)[0].split("|", 1)[0].strip()[:300]
    if dropped:
        first += f" (output cut at {MAX_OUTPUT // 1024} KiB, {dropped} more bytes dropped)"
    obs = Observation(value=float(code), unit="exit_code", detail=first or f"exit {code}",
                      values=_perfdata(text.strip().split("\n", 1)[0]))
    if code == 0 or (code == 1 and not cfg.warning_is_failure):
        return obs
    said = f": {first}" if first else ""
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        raise CheckFailed(f"exec {program}: killed by {name}{said}", "signal", observation=obs)
    status = NAGIOS.get(code)
    if status is None:
        raise CheckFailed(f"exec {program}: exit {code}{said}", "exit", observation=obs)
    if re.match(rf"^(\S+\s+)?{status}\b", first, re.IGNORECASE):
        reason = first  # the plugin already leads with its status ("DISK CRITICAL - /var 98% used")
    else:
        reason = f"exec {program}: {status} (exit {code}){said}"
    raise CheckFailed(reason, status.lower(), observation=obs)

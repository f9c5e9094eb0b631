"""StrictModes for root: a file the agent trusts must not be changeable by anyone but root."""

from __future__ import annotations

import os
import pwd
import shlex
import stat
import sys
import tomllib
from pathlib import Path

from agent.config import Config, ConfigError, load_config


def _owner(uid: int) -> str:
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def _problem(path: str, st: os.stat_result, is_dir: bool) -> str | None:
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid != 0:
        return f"{path} is owned by {_owner(st.st_uid)}, not root (fix: chown root {path})"
    if mode & 0o022 and not (is_dir and mode & stat.S_ISVTX):  # a sticky directory protects root's files
        who = "group- and world" if mode & 0o022 == 0o022 else ("group" if mode & 0o020 else "world")
        return f"{path} is {who}-writable (mode {mode:04o}; fix: chmod go-w {path})"
    return None


def untrusted(path: str | os.PathLike[str]) -> str | None:
    """Why root must not trust `path`, or None. Like sshd's StrictModes: the file and every directory
    above it (on the path as written and after resolving symlinks) must be owned by root and writable by
    no one else; a sticky directory such as /tmp is fine. Raises FileNotFoundError for a missing file.
    """
    written = Path(os.path.abspath(path))
    real = Path(os.path.realpath(path))
    problem = _problem(str(real), os.stat(real), is_dir=False)
    if problem:
        return problem
    seen: set[Path] = set()
    for d in [*written.parents, *real.parents]:
        if d in seen:
            continue
        seen.add(d)
        problem = _problem(str(d), os.stat(d), is_dir=True)
        if problem:
            return problem
    return None


def check_trusted(path: str | os.PathLike[str], key: str = "(file)") -> None:
    """As root, refuse a file others could have written (ConfigError naming it); otherwise do nothing."""
    if os.geteuid() != 0:
        return
    try:
        problem = untrusted(path)
    except FileNotFoundError:
        return  # reported by whoever reads it
    except OSError as e:
        raise ConfigError(str(path), [f"{key}: cannot check permissions: {e.strerror}"]) from None
    if problem:
        raise ConfigError(str(path), [f"{key}: refusing a file others can change while running as root: {problem}"])


def _too_open(path: str, st: os.stat_result) -> str | None:
    """Why a file holding a secret is readable (or changeable) by more than the agent, or None.

    PostgreSQL's rule for its TLS key, which ssh applies to private keys too: a file of the agent's own
    user allows no access to group or others (0600); a file of root's may also be read by its group
    (0640), so root can keep the token and hand it to the agent's group. No other owner: they could
    chmod it open at any time.
    """
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid == 0:
        if mode & (stat.S_IWGRP | stat.S_IXGRP | stat.S_IRWXO):
            return f"{path} has mode {mode:04o}, more than owner and group read (fix: chmod 640 {path})"
    elif st.st_uid == os.geteuid():
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            return f"{path} has mode {mode:04o}: its group or others can read it (fix: chmod 600 {path})"
    else:
        return f"{path} is owned by {_owner(st.st_uid)}, neither the agent's user nor root"
    return None


def read_secret(path: str, key: str) -> str:
    """The stripped text of a file holding a secret (a bearer token): ConfigError when others may read
    it, as ssh refuses a private key they could read, or when it cannot be read or is empty."""
    try:
        with open(path, "rb") as f:
            problem = _too_open(path, os.fstat(f.fileno()))  # the file being read, not one swapped in since
            if problem:
                raise ConfigError(path, [f"{key}: refusing a secret others can read: {problem}"])
            text = f.read().decode().strip()
    except OSError as e:
        raise ConfigError(path, [f"{key}: cannot read {path}: {e.strerror}"]) from None
    except UnicodeDecodeError:
        raise ConfigError(path, [f"{key}: {path} is not UTF-8 text"]) from None
    if not text:
        raise ConfigError(path, [f"{key}: {path} is empty"])
    return text


def load_trusted_config(path: str | os.PathLike[str]) -> Config:
    """load_config, after refusing (as root) a config file that others could have written."""
    check_trusted(path)
    return load_config(path)


def _allows_root(path: str | os.PathLike[str]) -> bool | None:
    """What the file's `[agent] allow_root` says, read without trusting or validating it; None when the
    file cannot be read as TOML (its own error is reported by load_config)."""
    try:
        data = tomllib.loads(Path(path).read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None
    agent = data.get("agent")
    return isinstance(agent, dict) and agent.get("allow_root") is True


def _ordinary_owner(path: str | os.PathLike[str]) -> str | None:
    try:
        uid = os.stat(path).st_uid
        return pwd.getpwuid(uid).pw_name if uid != 0 else None
    except (OSError, KeyError):
        return None


def root_refusal(path: str | os.PathLike[str]) -> str:
    """The one line that says root is refused, and the exact commands that work instead."""
    argv = list(sys.argv) if sys.argv and sys.argv[0] else ["healthgate"]
    if argv[0].endswith("__main__.py"):  # python -m agent
        argv[:1] = [sys.executable, "-m", "agent"]
    command = " ".join(shlex.quote(a) for a in argv)
    # Who ran sudo is the ordinary user at hand, else the one who owns the config file.
    user = os.environ.get("SUDO_USER") or _ordinary_owner(path) or "USER"
    return (f"agent.allow_root: refusing to run as root; run it as an ordinary user (the agent's group may use "
            f"its admin socket): `sudo -u {shlex.quote(user)} {command}`, or add `allow_root = true` under [agent] "
            f"in {path} (not recommended)")


def load_for_command(path: str | os.PathLike[str]) -> Config:
    """The config as every command that loads one may use it: the same rules for all of them.

    As root, any config without `allow_root = true` is refused, and that is said first: running as root is
    the first thing to change. The file's own errors follow (they hold for any user); its owner and mode do
    not (they matter to root only). Otherwise, as root, a file others could have
    written is refused (its exec checks would run as root, and `status` would send the token file it names
    to the address it names): a command that loads a config acts on what the config says, as the agent would.
    """
    if os.geteuid() == 0 and _allows_root(path) is False:
        errors = [root_refusal(path)]
        try:
            load_config(path)  # parsed only: nothing in it is acted on
        except ConfigError as e:
            errors += e.errors
        raise ConfigError(str(path), errors)
    check_trusted(path)
    cfg = load_config(path)
    if os.geteuid() == 0 and not cfg.agent.allow_root:
        raise ConfigError(str(path), [root_refusal(path)])
    return cfg

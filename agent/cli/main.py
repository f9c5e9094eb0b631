"""The healthgate command line: parses arguments, calls into the agent, maps outcomes to exit codes."""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from agent import __version__, logs
from agent.config import DEFAULT_PATH, Config, ConfigError, json_schema, load_config
from agent.trust import load_for_command

EXIT_OK, EXIT_UNCONFIRMED, EXIT_CONFIG = 0, 1, 2

DESCRIPTION = f"""\
healthgate samples this node's load and the health of what it depends on, and publishes ONE
verdict, up or down, to load balancers (HAProxy http-check and agent-check, nginx), Kubernetes
probes and Prometheus. A node that is only half working reports itself down.

The config file is taken from -c, else $HEALTHGATE_CONFIG, else {DEFAULT_PATH}.
"""

EPILOG = """\
exit codes: 0 ok / node up; 1 (drain/maint/ready) state written, but the running agent did not confirm
it (the agent did not answer, or it reads another state file); 2 config error, or (check, status, explain) node
down, draining or in maintenance, or (drain/maint/ready) state not written; 3 (status, explain) state
unknown: agent unreachable or details refused.
endpoints of `run`: /health /ready (200 up, 503 down), /live, /status, /status/journal, /metrics, and the
status page at /.
drain/maint/ready write the state file in [agent] state_dir; the running agent applies it within 500 ms.
signals of `run`: SIGTERM/SIGINT drain then exit 0; SIGHUP reloads the config (a bad file is refused), and
so does a change to the file within 2 s unless [agent] watch_config = false.
"""


def config_path(args: argparse.Namespace) -> str:
    return args.config or os.environ.get("HEALTHGATE_CONFIG") or DEFAULT_PATH


def load_or_report(path: str, loader: Callable[[str], Config] = load_for_command) -> Config | None:
    try:
        return loader(path)
    except ConfigError as e:
        for line in e.errors:
            print(f"{e.source}: {line}", file=sys.stderr)
        return None


def preflight(cfg: Config) -> list[str]:
    """What this host will refuse (no PSI, a missing command): warnings, since the config itself is valid."""
    return [f"checks[{i}] ({c.name}): {w}" for i, c in enumerate(cfg.checks) for w in c.preflight()]


def cmd_validate(args: argparse.Namespace) -> int:
    path = config_path(args)
    cfg = load_or_report(path, load_config)  # reads the file and acts on nothing in it: any file, any user
    if cfg is None:
        return EXIT_CONFIG
    for line in preflight(cfg):
        print(f"{path}: warning: {line}", file=sys.stderr)
    print(f"{path}: ok, {len(cfg.checks)} check(s)")
    return EXIT_OK


def cmd_schema(args: argparse.Namespace) -> int:
    print(json.dumps(json_schema(), indent=2))
    return EXIT_OK


def _use_loop(choice: str) -> None:
    if choice == "asyncio":
        return
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            print("healthgate: --loop uvloop asked for, but uvloop is not installed", file=sys.stderr)
            raise SystemExit(EXIT_CONFIG) from None
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def watchdog_problem(cfg, ping_every: float | None) -> str:
    """The service manager's watchdog must outlast a stall's recovery: no WATCHDOG=1 is sent while the loop
    recovers (loop_recovery after a lag over max_loop_lag), so a shorter watchdog kills a healthy agent."""
    if ping_every is None:
        return ""
    policy = cfg.policy
    if ping_every <= policy.loop_recovery + policy.max_loop_lag:
        return (f"policy.loop_recovery: the service manager's watchdog (WatchdogSec={ping_every * 2:g}s) must be more "
                f"than twice loop_recovery + max_loop_lag ({policy.loop_recovery + policy.max_loop_lag:g}s), or a "
                "short stall gets the agent killed: raise WatchdogSec or lower loop_recovery")
    return ""


def cmd_run(args: argparse.Namespace) -> int:
    path = config_path(args)
    cfg = load_or_report(path)
    if cfg is None:
        return EXIT_CONFIG
    logs.setup(cfg.agent.log_level, cfg.secrets())
    for line in preflight(cfg):
        logs.event("config_warning", logging.WARNING, warning=line)
    _use_loop(args.loop)

    from agent.app import Agent, end_past_stuck_lookups
    from agent.serving.sdnotify import Notifier

    notifier = Notifier.from_env()  # under systemd: READY/WATCHDOG/STOPPING; otherwise a no-op
    problem = watchdog_problem(cfg, notifier.watchdog)
    if problem:
        print(f"{path}: {problem}", file=sys.stderr)
        return EXIT_CONFIG

    def report(e: ConfigError | OSError) -> None:
        if isinstance(e, ConfigError):
            for line in e.errors:
                print(f"{e.source}: {line}", file=sys.stderr)
        else:
            host, port = cfg.server.listen
            print(f"{path}: server.listen: cannot listen on {host}:{port}: {e.strerror or e}", file=sys.stderr)

    async def main() -> int:
        agent = Agent(cfg, path, notifier=notifier)
        agent.handle_signals()
        try:
            await agent.start()
        except (ConfigError, OSError) as e:
            report(e)
            code = EXIT_CONFIG
        else:
            # What is alive now (modules, config, the app) lives as long as the process. Frozen, the cyclic
            # GC never walks it again: a full collection over it stalls the loop ~30 ms (a probe-latency
            # spike and a late check sample); after the freeze it takes well under a millisecond.
            gc.collect()
            gc.freeze()
            await agent.serve()
            code = EXIT_OK
        end_past_stuck_lookups(agent, code)  # a failed start may have left lookups stuck as well
        return code

    try:
        return asyncio.run(main())
    except (ConfigError, OSError) as e:
        report(e)
        return EXIT_CONFIG


def table_width(args: argparse.Namespace) -> int | None:
    """The columns a table is cut to: the terminal's ($COLUMNS, else 80 when not a terminal); None with --wide."""
    return None if args.wide else shutil.get_terminal_size().columns


def cmd_check(args: argparse.Namespace) -> int:
    path = config_path(args)
    cfg = load_or_report(path)
    if cfg is None:
        return EXIT_CONFIG
    from agent.cli.oneshot import run_once

    return run_once(cfg, color=args.color, width=table_width(args))


def _agent_access(args: argparse.Namespace) -> tuple[str, str | None, str | None] | int:
    """The agent's URL, status token and admin socket, from the options, else from the config file when
    there is one. The socket (when it is there) wins unless --url or --token-file ask for HTTP."""
    from agent.cli.remote import EXIT_UNKNOWN, admin_socket, agent_url, default_url

    cfg = None
    path = config_path(args)
    if args.url is None or args.token_file is None:
        explicit = bool(args.config or os.environ.get("HEALTHGATE_CONFIG"))
        if explicit or os.path.exists(path):
            cfg = load_or_report(path)
            if cfg is None:
                return EXIT_UNKNOWN
    if args.url is None and args.token_file is None:
        sock = admin_socket(cfg)
        if sock:
            return "", None, sock
    url = agent_url(args.url) if args.url else default_url(cfg)
    token_file = args.token_file or (cfg.server.status_token_file if cfg else None)
    token = None
    if token_file:
        try:
            token = Path(token_file).read_text().strip() or None
        except OSError as e:
            if args.token_file:  # asked for explicitly: say so; the config's file is only a convenience
                print(f"healthgate: --token-file {token_file}: {e.strerror}", file=sys.stderr)
                return EXIT_UNKNOWN
    return url, token, None


def cmd_status(args: argparse.Namespace) -> int:
    from agent.cli.remote import run_status
    from agent.cli.render import use_color

    access = _agent_access(args)
    if isinstance(access, int):
        return access
    url, token, sock = access
    return run_status(url, token, args.timeout, use_color(args.color, sys.stdout), args.transitions, sock,
                      args.group, table_width(args))


def cmd_explain(args: argparse.Namespace) -> int:
    from agent.cli.remote import run_explain

    access = _agent_access(args)
    if isinstance(access, int):
        return access
    url, token, sock = access
    return run_explain(url, token, args.timeout, sock, args.group)


def not_a_group(path: str, cfg: Config, group: str | None) -> bool:
    """True (and said on stderr) when `--group` names no group of the config."""
    if group is None or group in cfg.groups:
        return False
    known = ", ".join(cfg.groups) or "none"
    print(f"{path}: --group: no group named {group!r} in groups (known: {known})", file=sys.stderr)
    return True


def cmd_admin(args: argparse.Namespace) -> int:
    """Over the admin socket when the agent has one (it writes and applies the state at once); else the
    state file is written here and the agent picks it up."""
    from agent.cli.admin import confirm, set_admin_cli, who
    from agent.cli.remote import admin_socket, post_admin

    cfg = None
    path = config_path(args)
    explicit = bool(args.config or os.environ.get("HEALTHGATE_CONFIG"))
    if not args.state_dir or explicit or os.path.exists(path):  # the config also says where the agent listens
        cfg = load_or_report(path)
        if cfg is None:
            return EXIT_CONFIG
    if cfg is not None and not_a_group(path, cfg, args.group):
        return EXIT_CONFIG
    sock = admin_socket(cfg) if cfg is not None and not args.state_dir else None
    if sock:  # the agent writes the state file and applies it at once: nothing left to confirm
        ok, message = post_admin(sock, args.command, args.reason or f"{args.command} by {who()}",
                                 args.duration, timeout=2.0, group=args.group)
        if ok:
            print(message)
            return EXIT_OK
        # A stopped or hung agent: write the file here all the same, so the change is not lost and applies
        # once the agent reads it, and say that it was not confirmed (exit 1).
        print(message, file=sys.stderr)
    if args.state_dir:
        state_dir = args.state_dir
    else:
        assert cfg is not None  # without --state-dir the config was loaded above
        state_dir = cfg.agent.state_dir
    record, written, message = set_admin_cli(state_dir, args.command, args.reason, args.duration, args.group)
    print(message, file=sys.stdout if record else sys.stderr)
    if record is None or written is None:
        return EXIT_CONFIG
    if cfg is not None and not args.no_wait:
        problem = confirm(cfg, record, written, group=args.group)
        if problem:
            print(f"healthgate: {args.command} written to {written} but not confirmed: {problem}. The agent "
                  "applies the file once it reads it; --no-wait skips this check.", file=sys.stderr)
            return EXIT_UNCONFIRMED
    return EXIT_OK


def cmd_fleet_status(args: argparse.Namespace) -> int:
    from agent.fleet.status import run_fleet_status

    path = config_path(args)
    cfg = load_or_report(path)
    if cfg is None:
        return EXIT_CONFIG
    if cfg.fleet is None:
        print(f"{path}: no [fleet] table: this node is in no fleet group", file=sys.stderr)
        return EXIT_CONFIG
    logs.set_secrets(cfg.secrets())
    fleet = cfg.fleet
    if not_a_group(path, cfg, args.group):
        return EXIT_CONFIG
    if args.group is not None:
        fleet = fleet.for_verdict_group(args.group)
    return run_fleet_status(fleet, args.timeout, args.json)


def _duration_arg(text: str) -> float:
    from agent.admin import parse_for

    try:
        return parse_for(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _group_arg(text: str) -> str:
    import re

    from agent.probes.base import NAME_PATTERN

    if not re.fullmatch(NAME_PATTERN, text):
        raise argparse.ArgumentTypeError("a group name is letters, digits, _ . - (at most 63)")
    return text


def add_wide(p: argparse.ArgumentParser) -> None:
    p.add_argument("--wide", action="store_true", help="print every reason in full instead of cutting the table "
                                                        "to the terminal's width")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="healthgate", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"healthgate {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def add(name: str, help: str, func) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        return p

    def with_config(p: argparse.ArgumentParser) -> None:
        p.add_argument("-c", "--config", metavar="FILE", help=f"config file (default: $HEALTHGATE_CONFIG or {DEFAULT_PATH})")

    p = add("run", "run the agent: schedule checks and serve the verdict", cmd_run)
    with_config(p)
    p.add_argument("--loop", choices=("auto", "asyncio", "uvloop"), default="auto",
                   help="event loop; auto uses uvloop when it is installed (default: auto)")
    p = add("check", "run every check once, print a table, exit 0 if the node would be up, 2 if down", cmd_check)
    with_config(p)
    p.add_argument("--color", choices=("auto", "always", "never"), default="auto", help="colour the table")
    add_wide(p)
    for name, help, func in (
        ("status", "print a running agent's verdict, checks and recent transitions; "
                   "exit 0 up, 2 down/drain/maint, 3 unreachable", cmd_status),
        ("explain", "say in one paragraph why the node is down, or what would take it down next; "
                    "exit codes as status", cmd_explain),
    ):
        p = add(name, help, func)
        with_config(p)
        p.add_argument("--url", help="the agent's base URL; http:// when no scheme is given (default: from the "
                                     "config's server.listen, else http://127.0.0.1:8080)")
        p.add_argument("--token-file", metavar="FILE", help="file holding the status bearer token "
                                                            "(default: the config's server.status_token_file)")
        p.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the agent (default: 3)")
        p.add_argument("--group", type=_group_arg, metavar="NAME",
                       help="only this verdict group ([groups.NAME]): its verdict, admin state and checks; "
                            "the exit code is the group's (3 when the agent has no such group)")
        if name == "status":
            p.add_argument("--color", choices=("auto", "always", "never"), default="auto", help="colour the output")
            add_wide(p)
            p.add_argument("-n", "--transitions", type=int, default=10, metavar="N",
                           help="recent transitions to print (default: 10; 0 = none)")
    fleet = sub.add_parser("fleet", help="the fleet guard's group, as its store sees it",
                           description="the fleet guard's group, as its store sees it")
    fleet_sub = fleet.add_subparsers(dest="fleet_command", metavar="COMMAND", required=True)
    p = fleet_sub.add_parser("status", help="list the group's members: who serves, who is shed and why, who is "
                             "held, who stopped heartbeating; exit 0, 2 config error, 3 store unreachable")
    p.set_defaults(func=cmd_fleet_status)
    with_config(p)
    p.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the store (default: 3)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--group", type=_group_arg, metavar="NAME",
                   help="the budget of this verdict group ([groups.NAME]), counted apart from the node's")
    p = add("validate", "validate the config file: exit 0, or 2 with one line per error", cmd_validate)
    with_config(p)
    add("schema", "print the config file's JSON Schema", cmd_schema)
    for name, help in (("drain", "drain this node: /health answers 503 (or drain_status), HAProxy stops new sessions"),
                       ("maint", "put this node in maintenance: /health 503, HAProxy MAINT; survives restarts"),
                       ("ready", "end drain or maintenance")):
        p = add(name, help, cmd_admin)
        with_config(p)
        p.add_argument("--state-dir", metavar="DIR", help="state directory (default: [agent] state_dir of the config)")
        if name != "ready":
            p.add_argument("--for", dest="duration", type=_duration_arg, metavar="DURATION",
                           help="end by itself after this long (10m, 2h; at most 8760h, a year); "
                                "survives agent restarts")
        else:
            p.set_defaults(duration=None)
        p.add_argument("--reason", default="", metavar="TEXT", help="shown in /status, logs and HAProxy")
        p.add_argument("--group", type=_group_arg, metavar="NAME", help="only this verdict group ([groups.NAME]): its /health/NAME "
                                                      "and the HAProxy backend that agent-sends NAME")
        p.add_argument("--no-wait", action="store_true", help="don't wait for the running agent to confirm")
    return parser


EXIT_PIPE = 128 + 13  # as a tool killed by SIGPIPE: `healthgate schema | head -1` is not an error


def main(argv: list[str] | None = None) -> int | str | None:
    """The entry point: the command's exit status; a reader that closed the pipe ends it quietly."""
    code: int | str | None
    try:
        try:
            code = _main(argv)
        except SystemExit as e:  # argparse's --help, --version and usage errors print, then exit
            code = e.code
        sys.stdout.flush()  # a write still buffered fails here, not at exit with "Exception ignored"
    except BrokenPipeError:
        # Python's advice (signal module docs, "Note on SIGPIPE"): point stdout at devnull, so the flush at
        # exit has nowhere to fail, and exit as a tool killed by SIGPIPE does.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_PIPE
    return code


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_CONFIG
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130

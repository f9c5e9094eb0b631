"""The healthgate command line: parses arguments, calls into the agent, maps outcomes to exit codes."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Callable

from agent import __version__, logs
from agent.config import DEFAULT_PATH, Config, ConfigError, json_schema, load_config
from agent.trust import load_trusted_config

EXIT_OK, EXIT_DOWN, EXIT_CONFIG = 0, 2, 2

DESCRIPTION = f"""\
healthgate samples this node's load and the health of what it depends on, and publishes ONE
verdict, up or down, to load balancers (HAProxy http-check and agent-check, nginx), Kubernetes
probes and Prometheus. A node that is only half working reports itself down.

The config file is taken from -c, else $HEALTHGATE_CONFIG, else {DEFAULT_PATH}.
"""

EPILOG = """\
exit codes: 0 ok / node up; 2 config error, or (check) node down; 1 unexpected failure.
endpoints of `run`: /health /ready (200 up, 503 down), /live, /status, /metrics.
signals of `run`: SIGTERM/SIGINT drain then exit 0; SIGHUP reloads the config (a bad file is refused).
"""


def config_path(args: argparse.Namespace) -> str:
    return args.config or os.environ.get("HEALTHGATE_CONFIG") or DEFAULT_PATH


def load_or_report(path: str, loader: Callable[[str], Config] = load_config) -> Config | None:
    try:
        return loader(path)
    except ConfigError as e:
        for line in e.errors:
            print(f"{e.source}: {line}", file=sys.stderr)
        return None


def cmd_validate(args: argparse.Namespace) -> int:
    path = config_path(args)
    cfg = load_or_report(path)
    if cfg is None:
        return EXIT_CONFIG
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


def cmd_run(args: argparse.Namespace) -> int:
    path = config_path(args)
    cfg = load_or_report(path, load_trusted_config)  # as root, a file others can write is refused
    if cfg is None:
        return EXIT_CONFIG
    if os.geteuid() == 0 and not cfg.agent.allow_root:
        print(f"{path}: agent.allow_root: refusing to run as root; run as an unprivileged user "
              "or set allow_root = true in [agent]", file=sys.stderr)
        return EXIT_CONFIG
    logs.setup(cfg.agent.log_level, cfg.secrets())
    _use_loop(args.loop)

    from agent.app import Agent

    async def main() -> None:
        agent = Agent(cfg, path)
        await agent.start()
        await agent.serve()

    try:
        asyncio.run(main())
    except ConfigError as e:
        for line in e.errors:
            print(f"{e.source}: {line}", file=sys.stderr)
        return EXIT_CONFIG
    except OSError as e:
        host, port = cfg.server.listen
        print(f"{path}: server.listen: cannot listen on {host}:{port}: {e.strerror or e}", file=sys.stderr)
        return EXIT_CONFIG
    return EXIT_OK


def cmd_check(args: argparse.Namespace) -> int:
    path = config_path(args)
    cfg = load_or_report(path)
    if cfg is None:
        return EXIT_CONFIG
    from agent.oneshot import run_once

    return run_once(cfg, color=args.color)


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
    p = add("validate", "validate the config file: exit 0, or 2 with one line per error", cmd_validate)
    with_config(p)
    add("schema", "print the config file's JSON Schema", cmd_schema)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_CONFIG
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130

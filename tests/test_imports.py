"""The package's shape, held by tests: every module imports on its own, there are no import cycles, and
imports only point from a later stage to an earlier one (the pure core imports nothing of the rest).

The stages, earliest first. A module may import its own stage and earlier ones; a new module gets a stage
here, or this test fails naming it."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "agent"

STAGES: list[tuple[str, set[str]]] = [
    ("core: pure types, text and field helpers", {
        "agent", "agent.text", "agent.fields", "agent.model", "agent.logs", "agent.watch", "agent.access",
        "agent.fleet", "agent.fleet.scope", "agent.fleet.budget"}),
    ("probes: one module per check type", {"agent.probes", "agent.probes.*"}),
    ("config: the schema and its loading, the operator's state file record",
     {"agent.config", "agent.fleet.config", "agent.trust", "agent.admin"}),
    ("verdict: pure up/down over check views", {"agent.verdict"}),
    ("fleet guard: the shared store", {"agent.fleet.store", "agent.fleet.redis", "agent.fleet.etcd", "agent.fleet.backends",
                                       "agent.fleet.guard", "agent.fleet.status"}),
    ("serving decision: what every consumer says", {"agent.serving", "agent.serving.decision"}),
    ("state: the one place results, admin state and the clock meet", {"agent.state"}),
    ("runner: one sample under its timeout", {"agent.runner"}),
    ("scheduler: loops and the heartbeat", {"agent.scheduler"}),
    ("serving: listeners, handlers, metrics, the state file's watcher", {"agent.serving.*"}),
    ("the running agent, wired", {"agent.app"}),
    ("the command line", {"agent.cli", "agent.cli.*", "agent.__main__"}),
]

# Wrong arrows that exist today, each with the reason; the list only ever shrinks.
KNOWN: dict[tuple[str, str], str] = {}


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def stage(name: str) -> int:
    for rank, (_, members) in enumerate(STAGES):
        if name in members or any(m.endswith(".*") and name.startswith(m[:-1]) for m in members):
            return rank
    raise AssertionError(f"{name} has no stage in tests/test_imports.py STAGES: give it one")


def imports(path: Path, known: set[str], typing: bool = False) -> set[str]:
    """The agent modules `path` imports at run time (and, with `typing`, under `if TYPE_CHECKING:` too)."""
    tree = ast.parse(path.read_text())
    out: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test) and not typing:
                for sub in child.orelse:
                    visit(sub)
                continue
            if isinstance(child, ast.ImportFrom) and child.level == 0 and child.module and \
                    child.module.split(".")[0] == "agent":
                for alias in child.names:
                    full = f"{child.module}.{alias.name}"
                    out.add(full if full in known else child.module)
            elif isinstance(child, ast.Import):
                out.update(a.name for a in child.names if a.name.split(".")[0] == "agent")
            visit(child)

    visit(tree)
    return out


def test_every_module_has_a_stage() -> None:
    for name in modules():
        stage(name)


def test_imports_point_only_to_earlier_stages() -> None:
    known = modules()
    wrong = []
    for name, path in sorted(known.items()):
        for target in sorted(imports(path, set(known)) - {name}):
            if stage(target) > stage(name) and (name, target) not in KNOWN:
                wrong.append(f"{name} ({STAGES[stage(name)][0]}) imports {target} ({STAGES[stage(target)][0]})")
    assert not wrong, "\n".join(wrong)


def test_the_known_wrong_arrows_still_exist() -> None:
    """An exception that is gone is taken off the list, so that it cannot come back unnoticed."""
    known = modules()
    for name, target in KNOWN:
        assert target in imports(known[name], set(known)), f"{name} -> {target} is gone: remove it from KNOWN"


def test_no_import_cycles() -> None:
    """None at all: not at import time, not through an import inside a function, not even for the type
    checker (a cycle hidden behind a lazy or TYPE_CHECKING import is still two modules that each need the
    other)."""
    known = modules()
    graph = {name: imports(path, set(known), typing=True) - {name} for name, path in known.items()}
    # A package imports its own __init__ first: `agent.x` depends on `agent` implicitly, never the reverse.
    cycles, state, stack = [], dict.fromkeys(graph, 0), []

    def walk(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif state.get(nxt) == 0:
                walk(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if state[node] == 0:
            walk(node)
    assert not cycles, "\n".join(cycles)


# The libraries every module may use are imported once, before the fork: each child then imports one agent
# module into an interpreter that holds none, which is what a fresh interpreter would show of its imports.
ALONE = """
import importlib, os, sys, traceback
import aiohttp, aiohttp.web, prometheus_client, psutil, pydantic
failed, running = [], {}
def reap():
    pid, status = os.wait()
    if status:
        failed.append(running[pid])
    del running[pid]
for name in sys.argv[1:]:
    if len(running) >= 4:  # a few children at once: the machine's cores, not one after the other
        reap()
    pid = os.fork()
    if pid == 0:
        try:
            importlib.import_module(name)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    running[pid] = name
while running:
    reap()
print("FAILED " + " ".join(sorted(failed)) if failed else "OK")
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_every_module_imports_on_its_own() -> None:
    names = sorted(n for n in modules() if n != "agent.__main__")
    proc = subprocess.run([sys.executable, "-c", ALONE, *names], cwd=ROOT, capture_output=True, text=True,
                          timeout=240)
    assert proc.stdout.strip() == "OK", proc.stdout + proc.stderr

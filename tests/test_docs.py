"""The docs hold against the code: the configuration reference against the schema, every example against
the config loader and the command line, every relative link against the tree."""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

import agent
from agent import config as config_module
from agent.config import ConfigError, check_definition_name, json_schema, parse_config
from agent.fields import format_duration, parse_duration, parse_size
from agent.probes import PROBES
from tests.docs import FENCE, README, block, blocks, headings, page, pages, section
from tests.helpers import PASSING, ROOT

REFERENCE = "docs/configuration.md"
COMMON = "[[checks]]"  # the reference's label for the keys every check type shares


# --- The configuration reference against `healthgate schema` ------------------------------------------

def _ref(node: dict[str, Any]) -> str | None:
    """The definition a schema node points to, directly or as the non-null member of an anyOf."""
    if "$ref" in node:
        return node["$ref"].rsplit("/", 1)[1]
    refs = [n["$ref"] for n in node.get("anyOf", []) if "$ref" in n]
    return refs[0].rsplit("/", 1)[1] if len(refs) == 1 else None


def sections(schema: dict[str, Any]) -> dict[str, str]:
    """label -> definition for every table of the config: `[server]`, `[groups.NAME]`, and each check
    type by its name. A top-level key of another shape fails here, so a new one cannot go undocumented."""
    out = {}
    for key, node in schema["properties"].items():
        if (name := _ref(node)) is not None:
            out[f"[{key}]"] = name
        elif node.get("type") == "object" and (name := _ref(node.get("additionalProperties", {}))):
            out[f"[{key}.NAME]"] = name
        elif node.get("type") == "array" and "discriminator" in node.get("items", {}):
            for kind, target in node["items"]["discriminator"]["mapping"].items():
                out[kind] = target.rsplit("/", 1)[1]
        else:
            raise AssertionError(f"the test does not know how {key!r} is documented: teach sections() its shape")
    return out


def _models(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models(arg)]


def models() -> dict[str, type[BaseModel]]:
    """definition name -> the pydantic model behind it (for defaults made by a factory, which the schema omits)."""
    out = {check_definition_name(f"agent__probes__{kind}__Config"): PROBES[kind].Config for kind in PROBES}
    for field in config_module.full_config().model_fields.values():
        out.update({m.__name__: m for m in _models(field.annotation) if m.__name__ not in out})
    return out


def reference() -> dict[str, dict[str, str]]:
    """label -> key -> the default cell, from the tables of docs/configuration.md. A heading's label is its
    first code span (`[server]`, `tcp`); a row is | `key` | default | meaning |."""
    text = page(REFERENCE)
    prose = FENCE.sub(lambda m: re.sub(r"[^\n]", " ", m[0]), text)
    heads = {m.start(): m[2] for m in headings(text)}
    out: dict[str, dict[str, str]] = {}
    label = None
    offset = 0
    for line in prose.splitlines(keepends=True):
        if offset in heads:
            span = re.search(r"`([^`]+)`", heads[offset])
            label = span[1] if span else None
        offset += len(line)
        row = re.match(r"\|\s*`([a-z_0-9]+)`\s*\|(.*?)(?<!\\)\|", line)
        if row and label is not None:
            keys = out.setdefault(label, {})
            assert row[1] not in keys, f"{REFERENCE}: `{row[1]}` of {label} is documented twice"
            keys[row[1]] = row[2].strip()
    return out


def _patterns(node: Any) -> list[str]:
    """Every `pattern` a schema node holds, at any depth (a duration's sits inside anyOf, maybe twice)."""
    if isinstance(node, list):
        return [p for v in node for p in _patterns(v)]
    if not isinstance(node, dict):
        return []
    own = [node["pattern"]] if isinstance(node.get("pattern"), str) else []
    return own + [p for v in node.values() for p in _patterns(v)]


def _units(prop: dict[str, Any]) -> str | None:
    """'duration' or 'size' when the key takes a string with units, as its schema's pattern says."""
    patterns = _patterns(prop)
    if any(r"\s*ms" in p for p in patterns):
        return "duration"
    return "size" if any("[kKMGTP]i?" in p for p in patterns) else None


def _render(value: Any, units: str | None) -> str:
    return f'"{format_duration(value)}"' if units == "duration" and value is not None else json.dumps(value)


def _same(documented: Any, value: Any, units: str | None) -> bool:
    if units == "duration":
        return parse_duration(documented) == value
    if units == "size":
        return parse_size(documented) == value
    if isinstance(documented, bool) or isinstance(value, bool):
        return documented is value  # TOML's `1` is not `true`, though Python's 1 == True
    return documented == (list(value) if isinstance(value, tuple) else value)


def _cell(cell: str) -> tuple[str, Any]:
    """('required', None), ('value', a TOML value) or ('words', None) for a documented default."""
    if cell == "required":
        return "required", None
    if m := re.fullmatch(r"`([^`]+)`", cell):
        try:
            return "value", tomllib.loads(f"v = {m[1]}")["v"]
        except tomllib.TOMLDecodeError:
            pass
    return "words", None


def _problems(label: str, key: str, cell: str, definition: dict[str, Any], model: type[BaseModel]) -> list[str]:
    prop = definition["properties"][key]
    where = f"{REFERENCE}: `{key}` of {label}"
    kind, documented = _cell(cell)
    units = _units(prop)
    if key in definition.get("required", []):
        return [] if kind == "required" else [f"{where}: the schema requires it; the default cell must say required"]
    if kind == "required":
        return [f"{where}: documented as required, but the schema does not require it"]
    if "default" in prop:
        if prop["default"] is None:
            return [] if kind == "words" else [f"{where}: documents {cell}, but the schema has no default (unset)"]
        if kind != "value":
            return [f"{where}: documents {cell!r}, but the schema's default is {_render(prop['default'], units)}"]
        if not _same(documented, prop["default"], units):
            return [f"{where}: documents {cell}, but the schema's default is {_render(prop['default'], units)}"]
        return []
    # A default made by a factory: the schema omits it; the model has it (or it depends on the environment).
    if kind == "value":
        actual = model.model_fields[key].get_default(call_default_factory=True)
        if not _same(documented, actual, units):
            return [f"{where}: documents {cell}, but the default is {_render(actual, units)}"]
    return []


def test_configuration_reference_matches_the_schema() -> None:
    """Every key `healthgate schema` knows, of every section and check type, is in docs/configuration.md
    with the schema's default, and the reference documents no key the schema does not know."""
    schema = json_schema()
    defs, by_name, documented = schema["$defs"], models(), reference()
    labels = sections(schema)
    check_defs = [defs[labels[kind]] for kind in PROBES]
    common = set.intersection(*(set(d["properties"]) for d in check_defs))
    problems = [f"{REFERENCE}: no table under a heading `{label}`" for label in [*labels, COMMON]
                if label not in documented]
    problems += [f"{REFERENCE}: a table under `{label}`, which is no section or check type of the schema"
                 for label in documented if label not in labels and label != COMMON]
    for key, cell in documented.get(COMMON, {}).items():
        if key not in common:
            problems.append(f"{REFERENCE}: `{key}` of {COMMON} is not a key every check type has")
        else:
            for kind in PROBES:
                problems += _problems(COMMON, key, cell, defs[labels[kind]], by_name[labels[kind]])
    for label, name in labels.items():
        definition = defs[name]
        own = documented.get(label, {})
        shared = documented.get(COMMON, {}) if label in PROBES else {}
        for key in definition["properties"]:
            if key in own:
                problems += _problems(label, key, own[key], definition, by_name[name])
            elif key not in shared and label in documented:
                problems.append(f"{REFERENCE}: `{key}` of {label} is missing (the schema knows it)")
        problems += [f"{REFERENCE}: `{key}` of {label} is documented, but the schema does not know it"
                     for key in own if key not in definition["properties"]]
        problems += [f"{REFERENCE}: `{key}` of {label} is also in {COMMON}: document it once"
                     for key in own if key in shared]
    assert not problems, "\n".join(problems)


def test_reference_parser_sees_every_section() -> None:
    """The reference's parser finds the sections, the shared keys and each check type, with their rows:
    the schema test above cannot pass by reading nothing."""
    documented = reference()
    assert {"[server]", "[agent]", "[agent_check]", "[policy]", "[fleet]", "[groups.NAME]", COMMON} <= set(documented)
    assert set(PROBES) <= set(documented)
    assert documented["[server]"]["listen"] == '`"0.0.0.0:8080"`'
    assert documented[COMMON]["name"] == "required"
    assert documented["tcp"]["port"] == "—"


@pytest.mark.parametrize(("cell", "default", "units", "ok"), [
    ('`"5s"`', 5.0, "duration", True),
    ('`"500ms"`', 0.5, "duration", True),
    ('`"1s"`', 5.0, "duration", False),
    ('`"1GiB"`', 1024**3, "size", True),
    ("`true`", True, None, True),
    ("`1`", True, None, False),
    ('`["2xx"]`', ["2xx"], None, True),
    ("`95`", 95.0, None, True),
])
def test_documented_defaults_compare_after_parsing(cell: str, default: Any, units: str | None, ok: bool) -> None:
    """A documented default equals the schema's when it means the same value: "500ms" is 0.5 seconds,
    "1GiB" is 2**30 bytes; `1` is not `true`."""
    kind, value = _cell(cell)
    assert kind == "value"
    assert _same(value, default, units) is ok


# --- Examples -----------------------------------------------------------------------------------------

def _examples(*langs: str) -> list[tuple[str, int, str]]:
    return [(p.relative_to(ROOT).as_posix(), i, b) for p in pages() for i, b in enumerate(blocks(p.read_text(), *langs))]


TOML = _examples("toml")


@pytest.mark.parametrize(("name", "index", "text"), TOML, ids=[f"{n}:{i}" for n, i, _ in TOML])
def test_toml_example_validates(name: str, index: int, text: str) -> None:
    """Every TOML block of the README and the docs parses and validates as a config; a fragment without a
    critical check of its own (listener lines, an early-warning check) validates once one is added, and lacks
    nothing else."""
    data = tomllib.loads(text)
    try:
        parse_config(data)
    except ConfigError as e:
        assert len(e.errors) == 1 and e.errors[0].startswith("checks: "), e.errors
        assert "at least one critical check is required" in e.errors[0], e.errors
        parse_config({**data, "checks": [*data.get("checks", []), {**PASSING, "name": "readme-critical"}]})


def test_every_check_type_is_in_the_catalogue() -> None:
    """docs/checks.md has a section for every check type, headed by its name."""
    titled = {m[2].split("`")[1] for m in headings(page("docs/checks.md")) if m[2].startswith("`")}
    assert set(PROBES) <= titled, sorted(set(PROBES) - titled)


def test_there_are_examples_to_check() -> None:
    """The example tests read the pages: the catalogue alone has a TOML example per check type."""
    assert sum(1 for name, _, _ in TOML if name == "docs/checks.md") >= len(PROBES)
    assert len(_examples("sh", "shell", "console")) >= 10


DATA = [(lang, *example) for lang in ("yaml", "json") for example in _examples(lang)]


@pytest.mark.parametrize(("lang", "name", "index", "text"), DATA, ids=[f"{n}:{lang}{i}" for lang, n, i, _ in DATA])
def test_yaml_and_json_examples_parse(lang: str, name: str, index: int, text: str) -> None:
    """Every YAML and JSON block of the README and the docs parses."""
    assert (yaml.safe_load(text) if lang == "yaml" else json.loads(text)) is not None


# What a shell example may start with: the agent, the tools that build, install and run it, and the
# programs of the consumers the docs configure.
COMMANDS = {"healthgate", "make", "curl", "sudo", "systemctl", "haproxy", "nginx", "kubectl", "promtool", "python",
            "python3", "pip", "git", "docker", "install", "mutmut", "ssh", "chmod", "chown", "kill"}
OPERATORS = {"&&", "||", ";", "|"}


def commands(text: str, console: bool) -> list[list[str]]:
    """The commands of a shell block: lines joined at a trailing backslash, comments dropped, split at
    `&&`, `||`, `;` and `|`, redirections and leading VAR=value assignments left out. In a console block
    only the lines after a `$ ` prompt are commands."""
    lines = text.replace("\\\n", " ").splitlines()
    if console:
        lines = [line[2:] for line in lines if line.startswith("$ ")]
    out = []
    for line in lines:
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        lexer.commenters = "#"
        words: list[str] = []
        tokens = list(lexer)
        for i, token in enumerate(tokens):
            if token in OPERATORS:
                out.append(words)
                words = []
            elif token in (">", ">>", "<") or (i and tokens[i - 1] in (">", ">>", "<")):
                continue
            elif words or not re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", token):
                words.append(token)
        out.append(words)
    return [w for w in out if w]


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return next((a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)), {})


def _make_targets() -> set[str]:
    return set(re.findall(r"^([a-z][\w-]*):", (ROOT / "Makefile").read_text(), re.M))


def _command_problems(argv: list[str]) -> list[str]:
    from agent.cli.main import build_parser

    program = Path(argv[0]).name
    if program == "sudo":
        rest = argv[1:]
        while rest and rest[0].startswith("-"):
            rest = rest[2:] if rest[0] in ("-u", "-g") else rest[1:]
        return _command_problems(rest) if rest else ["sudo without a command"]
    if program not in COMMANDS:
        return [f"{program}: not a command the docs may use ({' '.join(sorted(COMMANDS))})"]
    if program == "make":
        targets = [w for w in argv[1:] if not w.startswith("-") and "=" not in w]
        return [f"make {t}: no such target in the Makefile" for t in targets if t not in _make_targets()]
    if program != "healthgate":
        return []
    parser = build_parser()
    words = [w for w in argv[1:] if not w.startswith("-")]
    choices = _subcommands(parser)
    if not words or words[0] not in choices:
        return [f"healthgate {' '.join(argv[1:])}: no such subcommand ({', '.join(choices)})"]
    inner = _subcommands(choices[words[0]])
    if inner and (len(words) < 2 or words[1] not in inner):
        return [f"healthgate {words[0]}: needs one of {', '.join(inner)}"]
    if any("[" in w or "|" in w for w in argv):
        return []  # a synopsis (`drain [--for DURATION]`): its subcommand is checked, not its placeholders
    try:
        parser.parse_args(argv[1:])
    except SystemExit:
        return [f"healthgate {' '.join(argv[1:])}: the command line refuses it"]
    return []


SHELL = _examples("sh", "shell", "console")


@pytest.mark.parametrize(("name", "index", "text"), SHELL, ids=[f"{n}:{i}" for n, i, _ in SHELL])
def test_shell_example_parses(name: str, index: int, text: str) -> None:
    """Every command of every shell block splits as a shell would, starts with a known program, names a
    real `healthgate` subcommand that the command line accepts, and names a real `make` target."""
    console = text.lstrip().startswith("$ ")
    found = commands(text, console)
    assert found, f"{name}: a shell block without commands"
    problems = [f"{name}: {p}" for argv in found for p in _command_problems(argv)]
    assert not problems, "\n".join(problems)


def test_shell_parsing_is_strict() -> None:
    """The shell check refuses an unknown program, subcommand or make target, and reads operators,
    prompts, comments, continuations and assignments as a shell would."""
    assert commands("A=1 make soak  # x\nsystemctl daemon-reload && systemctl enable --now x", False) == [
        ["make", "soak"], ["systemctl", "daemon-reload"], ["systemctl", "enable", "--now", "x"]]
    assert commands("$ curl -s 'a?b&c' \\\n  -o x\noutput line", True) == [["curl", "-s", "a?b&c", "-o", "x"]]
    assert commands("healthgate schema > out.json", False) == [["healthgate", "schema"]]
    assert _command_problems(["rm", "-rf", "/"])
    assert _command_problems(["healthgate", "frobnicate"])
    assert _command_problems(["healthgate", "drain", "--for", "forever"])
    assert _command_problems(["make", "tset"])
    assert not _command_problems(["sudo", "-u", "someone", "make", "run"])
    assert not _command_problems([".venv/bin/healthgate", "fleet", "status", "--json"])


def _runnable() -> list[list[str]]:
    """The `healthgate validate` and `healthgate schema` commands of every shell block: safe to run anywhere."""
    found = []
    for _, _, text in SHELL:
        for argv in commands(text, text.lstrip().startswith("$ ")):
            if Path(argv[0]).name == "healthgate" and argv[1:2] in (["validate"], ["schema"]) and argv not in found:
                found.append(argv)
    return found


def test_safe_shell_examples_run(tmp_path: Path) -> None:
    """The documented `healthgate validate` and `healthgate schema` commands run as written, from a directory
    holding the checkout's config/ and the quick start's my.toml: validate exits 0, schema prints the
    JSON Schema."""
    runnable = _runnable()
    assert any(argv[1] == "validate" for argv in runnable) and any(argv[1] == "schema" for argv in runnable)
    (tmp_path / "config").symlink_to(ROOT / "config")
    first = section(page("README.md"), "Your first config")
    (tmp_path / "my.toml").write_text(block(first, "toml"))
    # The package this test imports (the checkout, or the installed one), wherever the command runs from.
    home = str(Path(agent.__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [home, os.environ.get("PYTHONPATH")]))}
    for argv in runnable:
        proc = subprocess.run([sys.executable, "-m", "agent", *argv[1:]], cwd=tmp_path, capture_output=True,
                              text=True, timeout=60, env=env)
        assert proc.returncode == 0, (argv, proc.stdout, proc.stderr)
        if argv[1] == "schema":
            assert json.loads(proc.stdout)["title"] == "healthgate configuration"


# --- The README and its pages -------------------------------------------------------------------------

CONSUMERS = {"HAProxy": "docs/haproxy.md", "nginx": "docs/nginx.md", "Kubernetes": "docs/kubernetes.md",
             "Prometheus": "docs/prometheus.md", "systemd": "docs/systemd.md"}


def test_readme_is_short_and_links_each_consumer_page() -> None:
    """The README stays under 300 lines, and each consumer's section links its page and shows only an
    example that page also shows, where the tests of that page hold it (against deploy/, a real systemd)."""
    readme = README.read_text()
    assert len(readme.splitlines()) <= 300
    for title, name in CONSUMERS.items():
        text = section(readme, title)
        assert f"]({name})" in text, f"the README's {title} section does not link {name}"
        examples = blocks(text)
        assert examples, f"the README's {title} section has no example"
        for example in examples:
            assert example in page(name), f"the README's {title} example is not in {name}"


def test_kubernetes_probes_are_the_manifests() -> None:
    """The probes docs/kubernetes.md shows are those of the healthgate container in the sidecar manifest."""
    shown = yaml.safe_load(blocks(page("docs/kubernetes.md"), "yaml")[0])
    manifests = yaml.safe_load_all((ROOT / "deploy" / "kubernetes" / "sidecar.yaml").read_text())
    deployment = next(m for m in manifests if m and m.get("kind") == "Deployment")
    container = next(c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "healthgate")

    def within(part: Any, whole: Any) -> bool:
        if isinstance(part, dict):
            return isinstance(whole, dict) and all(k in whole and within(v, whole[k]) for k, v in part.items())
        return part == whole

    assert shown and within(shown, container), (shown, {k: container.get(k) for k in shown})


# --- Links --------------------------------------------------------------------------------------------

def slugs(text: str) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces as hyphens, a
    repeated heading numbered -1, -2, ..."""
    seen: dict[str, int] = {}
    out = set()
    for m in headings(text):
        title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", m[2])
        slug = re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def links(text: str) -> list[str]:
    """The targets of a page's Markdown links, outside code blocks and code spans."""
    prose = FENCE.sub("", text)
    prose = re.sub(r"``.*?``|`[^`\n]*`", "", prose)
    return re.findall(r"\]\(([^)\s]+)\)", prose)


@pytest.mark.parametrize("path", pages(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(path: Path) -> None:
    """Every relative link of the README and the docs leads to a file of the checkout, and its #anchor to a
    heading of that page."""
    problems = []
    for target in links(path.read_text()):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.is_relative_to(ROOT) or not dest.exists():
            problems.append(f"{target}: no such file")
        elif anchor and anchor not in slugs(dest.read_text()):
            problems.append(f"{target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    assert not problems, f"{path.relative_to(ROOT)}: " + "; ".join(problems)


def test_link_check_sees_links_and_anchors() -> None:
    """The link check reads links and anchors as GitHub does: code is no link, and a heading's code spans
    and punctuation drop out of its anchor."""
    assert links("[a](b.md) `[c](d.md)`\n```\n[e](f.md)\n```\n") == ["b.md"]
    assert slugs("# `tcp`: a connect succeeds (IPv4)\n## `[[checks]]`: keys\n## Endpoints\n## Endpoints\n") == {
        "tcp-a-connect-succeeds-ipv4", "checks-keys", "endpoints", "endpoints-1"}

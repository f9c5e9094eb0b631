"""Config validation: every rule has a bad file whose exact message (with its key path) is asserted."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from agent.cli import main as cli
from agent.config import ConfigError, load_config, parse_config
from agent.fields import format_duration, parse_duration
from agent.probes import TYPES
from tests.helpers import PASSING, ROOT, memory_check

CONFIGS = Path(__file__).parent / "configs"
INVALID = sorted(CONFIGS.glob("invalid-*.toml"))


def expected(path: Path) -> str:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# expect: "), f"{path.name} must start with '# expect: ...'"
    return first.removeprefix("# expect: ")


@pytest.mark.parametrize("path", INVALID, ids=[p.stem for p in INVALID])
def test_invalid_file_names_the_key(path: Path) -> None:
    """Each invalid file is refused with its key path and message."""
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert any(line.startswith(expected(path)) for line in err.value.errors), err.value.errors


@pytest.mark.parametrize("path", INVALID, ids=[p.stem for p in INVALID])
def test_validate_cli_exits_2_with_key_path(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`healthgate validate` on a bad file exits 2 and prints the key path, never a traceback."""
    # In-process through the same entry point as the console script (a process per file costs ~1 s);
    # test_several_errors_one_line_each and test_run_* cover the real process and its exit status.
    assert cli.main(["validate", "-c", str(path)]) == 2
    out = capsys.readouterr()
    assert expected(path) in out.err
    assert "Traceback" not in out.err + out.out


def test_several_errors_one_line_each(tmp_path: Path) -> None:
    """Every problem in a file is reported, one line each."""
    f = tmp_path / "c.toml"
    f.write_text('[server]\nlisten = "x:99999"\n[[checks]]\nname = "a"\ntype = "tcp"\nport = 1\n'
                 'interval = "1s"\ntimeout = "2s"\n')
    proc = subprocess.run([sys.executable, "-m", "agent", "validate", "-c", str(f)], capture_output=True,
                          text=True, cwd=ROOT, timeout=30)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 2
    assert lines[0].endswith("server.listen: port 99999 is out of range (0-65535)")
    assert lines[1].endswith("checks[0] (a).timeout: must be shorter than interval (1s)")


@pytest.mark.parametrize("problem, message", [
    ("missing", "(file): no such file"),
    ("directory", "(file): is a directory"),
    ("binary", "(file): not UTF-8 text"),
])
def test_unusable_files(tmp_path: Path, problem: str, message: str) -> None:
    """A missing file, a directory or binary junk is a config error, not a crash."""
    path = tmp_path / "c.toml"
    if problem == "directory":
        path.mkdir()
    elif problem == "binary":
        path.write_bytes(b"\xff\xfe\x00junk")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert err.value.errors[0].startswith(message)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file(tmp_path: Path) -> None:
    """An unreadable file is a config error naming the cause."""
    path = tmp_path / "c.toml"
    path.write_text("")
    path.chmod(0)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "cannot read" in err.value.errors[0]


def test_default_config_is_valid() -> None:
    """The shipped default config and every example validate."""
    for path in [ROOT / "config" / "healthgate.toml", *sorted((ROOT / "config").glob("examples/*.toml"))]:
        load_config(path)


def test_defaults_and_durations() -> None:
    """Durations take numbers or ms/s/m/h strings; omitted sections get defaults."""
    cfg = parse_config({"checks": [{"name": "a", "type": "tcp", "port": 1, "interval": "1m", "timeout": 1.5}]})
    assert cfg.checks[0].interval == 60 and cfg.checks[0].timeout == 1.5
    assert cfg.server.listen == ("0.0.0.0", 8080)
    assert cfg.checks[0].critical and cfg.checks[0].fall >= 1
    assert [parse_duration(x) for x in ("250ms", "2s", "1.5m", "1h", 3)] == [0.25, 2, 90, 3600, 3]
    assert [format_duration(x) for x in (0.25, 2, 90, 3600)] == ["250ms", "2s", "90s", "1h"]


def test_models_are_frozen() -> None:
    """A loaded config cannot be changed by accident."""
    cfg = parse_config({"checks": [PASSING]})
    with pytest.raises(ValidationError):
        cfg.server.shutdown_drain = 1  # type: ignore[misc]


def test_the_checkers_union_is_the_registry() -> None:
    """The union a type checker reads for Config.checks holds every registered check model, in the registry's
    order: a new check type cannot be left out of it."""
    tree = ast.parse((ROOT / "agent" / "config.py").read_text())
    alias = next(node for node in ast.walk(tree) if isinstance(node, ast.Assign)
                 and [ast.unparse(t) for t in node.targets] == ["CheckConfig"])
    annotated = alias.value  # Annotated[<the union>, Field(discriminator="type")]
    assert isinstance(annotated, ast.Subscript) and isinstance(annotated.slice, ast.Tuple)
    union = ast.unparse(annotated.slice.elts[0])
    assert union.split(" | ") == [f"{t}.Config" for t in TYPES]


def test_schema_command_prints_json_schema() -> None:
    """`healthgate schema` prints a JSON Schema that knows every check type."""
    proc = subprocess.run([sys.executable, "-m", "agent", "schema"], capture_output=True, text=True, cwd=ROOT,
                          timeout=30)
    assert proc.returncode == 0
    schema = json.loads(proc.stdout)
    assert schema["title"] == "healthgate configuration"
    text = json.dumps(schema)
    for kind in ("tcp", "http", "memory", "disk"):
        assert f'"const": "{kind}"' in text


def test_config_path_from_environment(tmp_path: Path) -> None:
    """HEALTHGATE_CONFIG names the file when -c is not given."""
    f = tmp_path / "c.toml"
    f.write_text(memory_check())
    proc = subprocess.run([sys.executable, "-m", "agent", "validate"], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "HEALTHGATE_CONFIG": str(f)}, timeout=30)
    assert proc.returncode == 0 and str(f) in proc.stdout



NO_CHECKS = "checks: no checks: at least one critical check is required, or the node would be UP with nothing checked"
NONE_CRITICAL = ("checks: every check has critical = false: at least one critical check is required, "
                 "or the node would be UP whatever the checks say")


@pytest.mark.parametrize("text, message", [
    ("", NO_CHECKS),
    ('[server]\nlisten = "127.0.0.1:8080"\n', NO_CHECKS),
    ('[[checks]]\nname = "m"\ntype = "memory"\ncritical = false\n', NONE_CRITICAL),
], ids=["empty", "no-checks", "none-critical"])
def test_nothing_to_vouch_for_is_a_config_error(tmp_path: Path, text: str, message: str) -> None:
    """An empty file, a config without checks and one whose checks are all non-critical are refused by
    `validate` and `run` with exit 2: the node would otherwise be UP with nothing checked."""
    f = tmp_path / "c.toml"
    for command in ("validate", "run"):
        # As root, run refuses a config without allow_root before anything else (test_cli_status.py).
        f.write_text("[agent]\nallow_root = true\n" + text if command == "run" and os.geteuid() == 0 else text)
        proc = subprocess.run([sys.executable, "-m", "agent", command, "-c", str(f)], capture_output=True,
                              text=True, cwd=ROOT, timeout=30)
        assert (proc.returncode, proc.stderr) == (2, f"{f}: {message}\n"), (command, proc.stdout)


def errors(*checks: dict, **tables: object) -> list[str]:
    with pytest.raises(ConfigError) as err:
        parse_config({**tables, "checks": [{**PASSING, "name": f"c{i}"} for i in range(3)] + list(checks)})
    return err.value.errors


@pytest.mark.parametrize("data, message", [
    ({"checks": [{**PASSING, "name": "cache", "max_used_precent": 90}]},
     "checks[0] (cache).max_used_precent: unknown key; did you mean max_used_percent?"),
    ({"server": {"listn": ":80"}, "checks": [PASSING]}, "server.listn: unknown key; did you mean listen?"),
    ({"agent_check": {"weight_flor": 5}, "checks": [PASSING]},
     "agent_check.weight_flor: unknown key; did you mean weight_floor?"),
    ({"groups": {"api": {"checks": ["mem"], "chekcs": []}}, "checks": [PASSING]},
     "groups.api.chekcs: unknown key; did you mean checks?"),
    ({"checks": [{**PASSING, "zzz": 1}]}, "checks[0] (mem).zzz: unknown key"),
])
def test_unknown_key_says_what_was_probably_meant(data: dict, message: str) -> None:
    """An unknown key names the closest key the table knows, when one is close enough to be a typo."""
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    assert message in err.value.errors, err.value.errors


def test_every_error_about_a_check_names_it() -> None:
    """checks[3] (cache).: the index and the name, whatever the rule (a field, a type, a duplicate name)."""
    assert errors({"name": "cache", "type": "memory", "max_used_precent": 90}) == [
        "checks[3] (cache).max_used_precent: unknown key; did you mean max_used_percent?"]
    assert errors({**PASSING, "name": "c1"}) == ["checks[3] (c1).name: duplicate check name 'c1' (first at checks[1])"]
    assert errors({"name": "cache", "type": "redis", "port": 0.5})[0].startswith("checks[3] (cache).port: ")


@pytest.mark.parametrize("key, value, message", [
    ("port", "6390", 'port: must be a whole number, not the string "6390" (write port = 6390, without quotes)'),
    ("fall", "3", 'fall: must be a whole number, not the string "3" (write fall = 3, without quotes)'),
    ("fall", 1.5, "fall: must be a whole number, not the number 1.5"),
    ("critical", 1, "critical: must be true or false, not the number 1"),
    ("critical", "no", 'critical: must be true or false, not the string "no"'),
    ("critical", "true", 'critical: must be true or false, not the string "true" (write critical = true, without quotes)'),
    ("host", 5, "host: must be a string in quotes, not the number 5"),
    ("port", 70000, "port: must be at most 65535, not 70000"),
])
def test_type_errors_are_exact_and_in_plain_words(key: str, value: object, message: str) -> None:
    """No value is coerced into another type, and the error says what was written and what was expected."""
    assert errors({"name": "cache", "type": "redis", key: value}) == [f"checks[3] (cache).{message}"]


@pytest.mark.parametrize("url, message", [
    ("/health", 'the string "/health" is not a URL: write the scheme and host, as in http://127.0.0.1:8080/health'),
    ("localhost:8080/health", 'the string "localhost:8080/health" must start with http:// or https://'),
])
def test_url_errors_are_healthgates_words(url: str, message: str) -> None:
    """A bad url is explained without pydantic's phrases ("relative URL without a base")."""
    assert errors({"name": "web", "type": "http", "url": url}) == [f"checks[3] (web).url: {message}"]


def test_no_error_of_the_corpus_speaks_pydantic() -> None:
    """Every message of the broken corpus is healthgate's own: none of pydantic's "Input should be ..."."""
    for path in INVALID:
        with pytest.raises(ConfigError) as err:
            load_config(path)
        assert not any("Input should" in line or "valid URL" in line for line in err.value.errors), (path, err.value.errors)


def test_validate_warns_about_a_missing_disk_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`healthgate validate` accepts a disk check whose path is missing here (it may exist on the node that
    runs it), and warns about it as it does about a missing exec program; an existing path gets no warning."""
    f = tmp_path / "c.toml"
    f.write_text(memory_check() + '[[checks]]\nname = "data"\ntype = "disk"\npath = "/srv/healthgate-no-such"\n'
                 f'[[checks]]\nname = "here"\ntype = "disk"\npath = "{tmp_path}"\n')
    assert cli.main(["validate", "-c", str(f)]) == 0
    out = capsys.readouterr()
    assert out.err == f"{f}: warning: checks[1] (data): path: /srv/healthgate-no-such does not exist on this host\n"
    assert out.out == f"{f}: ok, 3 check(s)\n"

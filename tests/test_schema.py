"""`healthgate schema` is the truth: what it accepts is what validates, key for key and value for value."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator
from pydantic import BaseModel, ValidationError

from agent.config import Config, ConfigError, check_definition_name, json_schema, parse_config
from agent.fields import DAY, HOUR, bounded_duration, duration_pattern, format_duration
from agent.probes import PROBES
from tests.helpers import PASSING

SCHEMA = json_schema()


def models() -> Iterator[tuple[str, type[BaseModel]]]:
    """Every config model with the name of its schema definition."""
    yield "(top level)", Config
    for field in ("server", "agent", "policy", "agent_check"):
        model = Config.model_fields[field].annotation
        yield model.__name__, model
    for kind, module in PROBES.items():
        yield check_definition_name(f"agent__probes__{kind}__Config"), module.Config


def definition(name: str) -> dict[str, Any]:
    return SCHEMA if name == "(top level)" else SCHEMA["$defs"][name]


def fields() -> Iterator[tuple[str, str, type[BaseModel], str]]:
    for name, model in models():
        for key in model.model_fields:
            yield f"{model.__name__ if name == '(top level)' else name}.{key}", name, model, key


FIELDS = list(fields())
CHECK_KINDS = {check_definition_name(f"agent__probes__{kind}__Config"): kind for kind in PROBES}


def accepts(schema: dict[str, Any], value: Any) -> bool:
    return Draft202012Validator({**schema, "$defs": SCHEMA["$defs"]}).is_valid(value)


# The fewest keys each model needs to validate. Checks sample at the longest interval, so that "timeout must
# be shorter than interval" never decides for a timeout.
CHECK = {"interval": "24h"}
MINIMAL: dict[str, dict[str, Any]] = {
    "tcp": {"port": 1}, "http": {"url": "http://127.0.0.1/"}, "pressure": {"resource": "cpu", "max_avg10": 50},
    "listen_queue": {"port": 1}, "process": {"process_name": "x"}, "exec": {"command": ["true"]},
    "file": {"path": "/x"}, "dns": {"query_name": "a.test"},
}
# Rules between two keys of one check, which a schema for one key cannot state: validation also refuses
# these, with this message, for values the key's own schema accepts.
ACROSS_KEYS = {"max_latency": "must be shorter than timeout", "window": "must be 0 or at least interval"}
# Strings a parser reads (a URL, an IP address with an optional port, an HTTP status range): the schema
# gives their type and format; JSON Schema has no exact pattern for them, so only their type is compared.
PARSED = {"HttpCheck.url", "HttpCheck.expect_status", "DnsCheck.server", "ListenQueueCheck.host"}


def minimal(name: str) -> dict[str, Any]:
    if name == "(top level)":
        return {"checks": [PASSING]}
    if name in CHECK_KINDS:
        kind = CHECK_KINDS[name]
        return {"name": "a", "type": kind, **CHECK, **MINIMAL.get(kind, {})}
    return {}


def validates(name: str, model: type[BaseModel], key: str, value: Any) -> bool:
    """Whether `value` at `key` validates: the model's verdict on that key alone (errors of other keys, and
    rules of the whole model, are theirs)."""
    try:
        model.model_validate({**minimal(name), key: value})
    except ValidationError as e:
        mine = [err for err in e.errors() if err["loc"][:1] == (key,)]
        return all(ACROSS_KEYS.get(key, "\0") in err["msg"] for err in mine)
    return True


def test_the_schema_is_valid_json_schema() -> None:
    """The printed schema is itself a valid draft 2020-12 schema."""
    Draft202012Validator.check_schema(SCHEMA)


@pytest.mark.parametrize("name, model", list(models()), ids=[n for n, _ in models()])
def test_schema_keys_are_the_model_keys(name: str, model: type[BaseModel]) -> None:
    """Every key the schema documents exists in the model and every key of the model is in the schema;
    any other key is refused by both."""
    d = definition(name)
    assert set(d["properties"]) == set(model.model_fields)
    assert d["additionalProperties"] is False


@pytest.mark.parametrize("path, name, model, key", FIELDS, ids=[f[0] for f in FIELDS])
def test_every_schema_default_validates(path: str, name: str, model: type[BaseModel], key: str) -> None:
    """A default the schema shows is accepted by the schema and by validation."""
    prop = definition(name)["properties"][key]
    if "default" not in prop:
        return
    assert accepts(prop, prop["default"]), prop
    assert validates(name, model, key, prop["default"])


def test_listen_default_is_the_documented_string() -> None:
    """server.listen's schema default is a HOST:PORT string, the only form that validates."""
    assert SCHEMA["$defs"]["ServerConfig"]["properties"]["listen"]["default"] == "0.0.0.0:8080"
    with pytest.raises(ConfigError) as err:
        parse_config({"server": {"listen": ["0.0.0.0", 8080]}, "checks": [PASSING]})
    assert err.value.errors == ['server.listen: must be a string HOST:PORT, for example "127.0.0.1:8080"']


# Values aimed at every kind of field: numbers around each bound, durations in every unit at and past their
# maximum, listen addresses, wrong types. NaN and infinity are left out: JSON has neither.
SAMPLES: list[Any] = [
    None, True, False, [], {}, [1], {"a": 1}, ["0.0.0.0", 8080], "", "x", "soon", "yes", "true", "1e3",
    -1, 0, 0.0, 0.5, 1, 2, 5, 10, 50, 99.5, 100, 101, 255, 4096, 4097, 65535, 65536, 3599, 3600, 3600.5, 3601,
    86400, 86400.0001, 86401, 2592000, 2592001, 31536000, 1e300,
    "0", "0s", "0.0ms", "1", "5", "500ms", "2s", "5 s", "1.5m", "1h", "1.0h", "1.01h", "59m", "60m", "61m",
    "3600s", "3600.000s", "3600.001s", "3600000ms", "3600001ms", "24h", "24.0h", "24.5h", "25h", "1440m",
    "1441m", "86400", "86400000ms", "86400001ms", "720h", "721h", "3000h", "1e300h", "007.50s", "5sec", "-1s",
    "127.0.0.1:8080", "[::1]:8080", ":8080", "0.0.0.0:0", "host:65535", "host:65536", "host:080", "localhost",
    "host:", "host:80x", "host:+80",
    "1KiB", "512MiB", "2GB", "1.5Gi", "10 G", "1XB",
    "GET", "HEAD", "cpu", "memory", "some", "full", "primary", "debug", "info", "drain", "2xx", "/", "/tmp",
    "relative/path", "a.b-c_d", "-bad", "a" * 63, "a" * 64,
]


@pytest.mark.parametrize("path, name, model, key", FIELDS, ids=[f[0] for f in FIELDS])
def test_schema_accepts_exactly_what_validates(path: str, name: str, model: type[BaseModel], key: str) -> None:
    """For every key and every sample value, the schema accepts the value if and only if it validates."""
    prop = definition(name)["properties"][key]
    samples = [v for v in SAMPLES if not (path in PARSED and isinstance(v, str | list))]
    wrong = [(v, accepts(prop, v)) for v in samples if accepts(prop, v) != validates(name, model, key, v)]
    assert not wrong, f"{path}: (value, schema accepts) where validation disagrees: {wrong}"


@pytest.mark.parametrize("checks", [
    [], [{**PASSING, "critical": False}], [PASSING], [{**PASSING, "critical": False}, {**PASSING, "name": "b"}],
], ids=["none", "none-critical", "one", "one-of-two"])
def test_schema_states_the_critical_check_rule(checks: list[dict]) -> None:
    """The schema refuses a config without a critical check exactly when validation does."""
    try:
        parse_config({"checks": checks})
        ok = True
    except ConfigError:
        ok = False
    assert accepts(SCHEMA, {"checks": checks}) == ok
    assert not accepts(SCHEMA, {})


def test_duration_bounds_are_in_the_schema_and_the_message() -> None:
    """Every duration carries its maximum in the schema, and a value past it is refused naming the bound."""
    bounded = 0
    for _path, name, model, key in FIELDS:
        prop = definition(name)["properties"][key]
        branches = [b for b in prop.get("anyOf", []) for b in b.get("anyOf", [b])]
        numbers = [b for b in branches if b.get("type") == "number" and "maximum" in b]
        if not numbers or not any("pattern" in b for b in branches):
            continue
        bounded += 1
        maximum = numbers[0]["maximum"]
        with pytest.raises(ValidationError, match=f"must be at most {format_duration(maximum)}"):
            model.model_validate({**minimal(name), key: maximum + 1})
        assert validates(name, model, key, maximum)
    assert bounded >= 17  # interval, timeout, fast_interval, the policy, server and agent_check ones, probes'


@settings(max_examples=300, deadline=None)
@given(st.from_regex(r"\A\s?0{0,2}[0-9]{1,10}(\.[0-9]{1,4})?\s?(ms|s|m|h)?\s?\Z"))
def test_duration_strings_validate_iff_the_pattern_matches(text: str) -> None:
    """For any duration string, each bound's schema pattern matches exactly when validation accepts it."""
    for maximum in (HOUR, DAY, 30 * DAY):
        for positive in (False, True):
            try:
                bounded_duration(text, maximum, positive)
                ok = True
            except ValueError:
                ok = False
            assert bool(re.search(duration_pattern(maximum, positive), text)) == ok, (text, maximum, positive)


def test_check_definitions_have_readable_names() -> None:
    """Editors show the definition names: a check type's table is `HttpCheck`, `ListenQueueCheck`, never
    the module path pydantic would spell out, and every reference points at a definition that exists."""
    defs = SCHEMA["$defs"]
    assert {"HttpCheck", "ListenQueueCheck", "MemoryCheck", "TcpCheck"} <= set(defs)
    assert not [name for name in defs if "__" in name]
    refs = re.findall(r'"#/\$defs/([^"]+)"', json.dumps(SCHEMA))
    assert refs and all(r in defs for r in refs)

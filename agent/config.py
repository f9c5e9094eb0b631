"""The config file: typed, strict pydantic models and load_config(path)."""

from __future__ import annotations

import difflib
import functools
import json
import os
import re
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union, get_args

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from agent.fields import DAY, HOUR, Duration, Listen, Network, Strict
from agent.fleet.config import FleetConfig
from agent.probes import PROBES
from agent.probes.base import NAME_PATTERN

if TYPE_CHECKING:
    from pydantic.config import JsonDict
    from pydantic_core import ErrorDetails

    from agent.probes import (
        cpu,
        disk,
        dns,
        exec,
        fds,
        file,
        http,
        listen_queue,
        load,
        memory,
        postgres,
        pressure,
        process,
        redis,
        swap,
        tcp,
        tls,
    )

    # What a type checker reads for Config.checks: the union of every check model, in the registry's order
    # (tests/test_config.py holds the two lists together). At run time the name does not exist: the union is
    # built from the registry, of only the types a config names (config_model), so only their modules load.
    CheckConfig = Annotated[
        tcp.Config | http.Config | memory.Config | disk.Config | cpu.Config | load.Config | swap.Config
        | pressure.Config | fds.Config | listen_queue.Config | process.Config | exec.Config | file.Config
        | tls.Config | dns.Config | redis.Config | postgres.Config,
        Field(discriminator="type"),
    ]

DEFAULT_PATH = "/etc/healthgate/healthgate.toml"
SOCKET_NAME = "healthgate.sock"


def check_union(types: tuple[str, ...]) -> Any:
    """The discriminated union of the check models of `types` (imports those probe modules)."""
    return Annotated[
        Union[tuple(PROBES[t].Config for t in types)],  # noqa: UP007 - built from the registry
        Field(discriminator="type"),
    ]



def _default_state_dir() -> str:
    # systemd's StateDirectory= sets STATE_DIRECTORY; otherwise the XDG place for the running user.
    if os.environ.get("STATE_DIRECTORY"):
        return os.environ["STATE_DIRECTORY"].split(":")[0]
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "healthgate")


class ServerConfig(Strict):
    listen: Listen = Field(default="0.0.0.0:8080", validate_default=True,
                           description="/health /ready /live /status /metrics")
    shutdown_drain: Annotated[float, Duration(HOUR)] = Field(
        default=5.0, description="how long DOWN is served after SIGTERM before exit")
    drain_status: Literal[503, 404] = Field(
        default=503, description="status of /health while draining; 404 for HAProxy's http-check disable-on-404"
    )
    max_connections: int = Field(default=512, ge=1, le=65535, description="open connections beyond this are closed")
    max_request_rate: float = Field(
        default=100, ge=0, le=1_000_000, description="requests a second one client address may make to anything but "
        "the probes (/health, /ready, /live and their groups, as the fast responder answers them; a probe only "
        "aiohttp can take counts a tenth, and none with fast_health = false); beyond it 429 and the connection "
        "is closed, so junk cannot starve the probes; 0 = no limit")
    read_timeout: Annotated[float, Duration(HOUR, positive=True)] = Field(
        default=5.0, description="a client must send its request within this")
    fast_health: bool = Field(
        default=True, description="answer /health /ready /live /metrics with a minimal responder, aiohttp loaded "
        "for the first other request; false = aiohttp only, loaded at start"
    )
    status_token_file: str | None = Field(
        default=None, description="bearer token that unlocks details (/status, reasons, the journal, the page)"
    )
    trusted_networks: list[Network] = Field(
        default_factory=list, description="clients from these networks see details without a token; loopback is "
        "not trusted unless listed (a local proxy or a pod's other containers are loopback too)"
    )
    allow_from: list[Network] | None = Field(
        default=None, min_length=1, description="only clients from these networks may connect; others are closed "
        "without a reply. Unset: any client"
    )
    admin_socket: str | None = Field(
        default=None, description="unix socket for local operators (mode 0660, details and drain/maint/ready "
        "without a token); default $RUNTIME_DIRECTORY/healthgate.sock, else healthgate.sock in state_dir; \"\" = none"
    )
    admin_token_file: str | None = Field(
        default=None, description="bearer token for POST /admin/drain|maint|ready; without it those paths are 404"
    )


class AgentCheckConfig(Strict):
    listen: Listen | None = Field(default=None, description="HAProxy agent-check TCP listener; off when unset")
    weight_source: Literal["cpu", "pressure", "load", "off"] = Field(
        default="cpu", description="load headroom the weight follows: cpu busy, PSI cpu avg10, load per CPU; off = 100%"
    )
    weight_floor: int = Field(default=10, ge=1, le=100, description="the weight never goes below this (percent)")
    weight_smoothing: Annotated[float, Duration(HOUR)] = Field(
        default=10.0, description="EWMA time constant of the headroom; 0 = raw")
    slow_start: Annotated[float, Duration(HOUR)] = Field(
        default=30.0, description="after a recovery, a drain or maintenance the weight ramps from weight_floor over this long"
    )
    max_connections: int = Field(default=64, ge=1, le=4096, description="agent-check connections beyond this are closed")
    allow_from: list[Network] | None = Field(
        default=None, min_length=1, description="only clients from these networks may connect (HAProxy's "
        "addresses); others are closed without a reply. Unset: any client"
    )
    send_reasons: bool = Field(
        default=True, description="add the reason after '#' (shown in HAProxy's stats); false = the state words only"
    )


MIN_LOOP_LAG = 0.05


class PolicyConfig(Strict):
    stale_grace: Annotated[float, Duration(HOUR)] = Field(
        default=1.0, description="a check whose last result is older than interval + timeout + this counts as failing"
    )
    max_loop_lag: Annotated[float, Duration(HOUR, positive=True)] = Field(
        default=0.5, description="event-loop lag beyond this makes the verdict DOWN (the agent can't vouch); "
                                 "at least 50ms"
    )
    loop_recovery: Annotated[float, Duration(HOUR)] = Field(
        default=2.0, description="the loop must stay under max_loop_lag this long before the verdict can be UP"
    )
    flap_window: Annotated[float, Duration(DAY, positive=True)] = Field(
        default=60.0, description="window in which flaps (failures after a pass) are counted")

    @field_validator("max_loop_lag")
    @classmethod
    def _honourable_lag(cls, v: float) -> float:
        # A Python event loop's own scheduling jitter on a busy host reaches a few milliseconds: a limit
        # below this would report a healthy, idle agent as stalled (a false DOWN).
        if v < MIN_LOOP_LAG:
            raise ValueError(f"must be at least {MIN_LOOP_LAG * 1000:g}ms: below that, an idle agent's own "
                             "scheduling jitter would read as a stall")
        return v
    flap_threshold: int = Field(
        default=5, ge=0, le=1000, description="this many flaps within flap_window mark a check flapping: down, and held; 0 = off"
    )
    flap_hold: Annotated[float, Duration(DAY)] = Field(
        default=30.0, description="a flapping check must pass for this long before it rises again"
    )


class AgentConfig(Strict):
    state_dir: str = Field(default_factory=_default_state_dir, description="where drain/maintenance state is kept")
    allow_root: bool = Field(default=False, description="permit running as uid 0")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    watch_config: bool = Field(
        default=True, description="reload when the config file changes (an edit, a ConfigMap update), as SIGHUP does"
    )


class GroupConfig(Strict):
    checks: list[str] = Field(description="the checks this group's verdict needs (critical or not); at least one",
                              json_schema_extra={"minItems": 1})

    @field_validator("checks")
    @classmethod
    def _not_empty(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("a group needs at least one check, or it would be UP with nothing checked")
        return v


# An item that does not say critical = false: the schema's half of _something_to_vouch_for.
_CRITICAL: JsonDict = {"not": {"required": ["critical"], "properties": {"critical": {"const": False}}}}


class Config(Strict):
    model_config = ConfigDict(**Strict.model_config, json_schema_extra={"required": ["checks"]})

    server: ServerConfig = Field(default_factory=ServerConfig)
    agent: AgentConfig = Field(default_factory=AgentConfig)
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    agent_check: AgentCheckConfig = Field(default_factory=AgentCheckConfig)
    fleet: FleetConfig | None = Field(default=None, description="the fleet guard; off when the table is absent")
    checks: list[CheckConfig] = Field(  # noqa: F821 - the union of all types, see full_config()
        default_factory=list, validate_default=True,
        description="at least one must be critical: the verdict is UP only when every critical check passes",
        json_schema_extra={"minItems": 1, "contains": _CRITICAL},
    )
    groups: dict[str, GroupConfig] = Field(
        default_factory=dict, description="verdict groups: /health/<group>, /ready/<group>, agent-send <group>"
    )

    @field_validator("checks")
    @classmethod
    def _something_to_vouch_for(cls, v: list[Any]) -> list[Any]:
        # UP means "every critical check passes"; with none, UP would vouch for nothing. An empty or
        # truncated file lands here too, so a reload with one is refused and the old config keeps serving.
        if not v:
            raise ValueError("no checks: at least one critical check is required, "
                             "or the node would be UP with nothing checked")
        if not any(c.critical for c in v):
            raise ValueError("every check has critical = false: at least one critical check is required, "
                             "or the node would be UP whatever the checks say")
        return v

    def secrets(self) -> tuple[str, ...]:
        fleet = self.fleet.secrets() if self.fleet else ()
        return tuple(s for s in (*fleet, *(s for c in self.checks for s in c.secrets())) if s)

    def admin_socket(self) -> str | None:
        """The admin socket's path, or None when `server.admin_socket = ""` turns it off."""
        if self.server.admin_socket is not None:
            return self.server.admin_socket or None
        runtime = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]  # systemd's RuntimeDirectory=
        return os.path.join(runtime or self.agent.state_dir, SOCKET_NAME)


class ConfigError(Exception):
    """A config that can't be used; `errors` holds one line per problem, each led by its key path."""

    def __init__(self, source: str, errors: list[str]):
        super().__init__(f"{source}: " + "; ".join(errors))
        self.source = source
        self.errors = errors


def _label(node: Any) -> str:
    """" (cache)" for a check (any table) with a well-formed name, so an error says which one it is about."""
    name = node.get("name") if isinstance(node, dict) else None
    return f" ({name})" if isinstance(name, str) and re.fullmatch(NAME_PATTERN, name) else ""


def _path(loc: tuple[Any, ...], data: Any) -> str:
    """checks[2] (web).timeout from pydantic's ('checks', 2, 'http', 'timeout'): drop the union tag, name the check."""
    out = ""
    node = data
    for part in loc:
        if isinstance(part, int):
            node = node[part] if isinstance(node, list) and part < len(node) else None
            out += f"[{part}]{_label(node)}"
            continue
        if isinstance(node, dict) and part not in node and part == node.get("type"):
            continue  # the discriminator's tag, not a key the user wrote
        if isinstance(node, dict) and node.get("type") == part and part in PROBES:
            continue
        out += ("." if out else "") + str(part)
        node = node.get(part) if isinstance(node, dict) else None
    return out or "(top level)"


def _models(annotation: Any) -> list[type[BaseModel]]:
    """The models a field's type may hold: itself, or inside Annotated, Optional, list[...], dict[str, ...]."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in get_args(annotation) for m in _models(arg)]


def _known_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The keys the table at `loc` may hold (`loc` ends with the key that was refused)."""
    models: list[type[BaseModel]] = [model]
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        if isinstance(part, str) and part in PROBES and not any(part in m.model_fields for m in models):
            models = [PROBES[part].Config]  # the union's tag: the check model of that type
            continue
        field = next((m.model_fields[part] for m in models if part in m.model_fields), None)
        if field is not None:
            models = _models(field.annotation)
        # else a key of a dict (a group's name): its values are the models already found
    return sorted({name for m in models for name in m.model_fields})


def _unknown_key(model: type[BaseModel], loc: tuple[Any, ...]) -> str:
    close = difflib.get_close_matches(str(loc[-1]), _known_keys(model, loc), n=1, cutoff=0.6)
    return f"unknown key; did you mean {close[0]}?" if close else "unknown key"


def _toml(value: Any) -> str:
    """The value as the user wrote it, in TOML's words."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f"the string {json.dumps(value[:40] + ('...' if len(value) > 40 else ''))}"
    if isinstance(value, int | float):
        return f"the number {value!r}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a table"
    return type(value).__name__


def _unquote(key: Any, value: Any, kind: type) -> str:
    """" (write port = 6390, without quotes)" when a quoted string holds what was expected."""
    if not isinstance(value, str):
        return ""
    text = value.strip()
    if kind is bool and text in ("true", "false"):
        return f" (write {key} = {text}, without quotes)"
    if kind is int and text.isascii() and text.lstrip("-").isdigit():
        return f" (write {key} = {int(text)}, without quotes)"
    return ""


# pydantic's error types in healthgate's words: {value} is what the user wrote, as TOML says it.
_WORDS = {
    "int_type": "must be a whole number, not {value}",
    "int_parsing": "must be a whole number, not {value}",
    "int_from_float": "must be a whole number, not {value}",
    "float_type": "must be a number, not {value}",
    "float_parsing": "must be a number, not {value}",
    "finite_number": "must be a finite number",
    "bool_type": "must be true or false, not {value}",
    "bool_parsing": "must be true or false, not {value}",
    "string_type": "must be a string in quotes, not {value}",
    "list_type": "must be a list [...], not {value}",
    "tuple_type": "must be a list [...], not {value}",
    "dict_type": "must be a table, not {value}",
    "model_type": "must be a table, not {value}",
    "model_attributes_type": "must be a table, not {value}",
    "greater_than_equal": "must be at least {ge}, not {input}",
    "greater_than": "must be more than {gt}, not {input}",
    "less_than_equal": "must be at most {le}, not {input}",
    "less_than": "must be less than {lt}, not {input}",
    "literal_error": "must be {expected}, not {value}",
    "enum": "must be {expected}, not {value}",
    "string_too_short": "must not be empty",
    "string_too_long": "must be at most {max_length} characters long",
    "too_short": "needs at least {min_length} item(s)",
    "too_long": "may hold at most {max_length} item(s)",
    "string_pattern_mismatch": "{value} is not allowed here (it must match {pattern})",
    "url_type": "must be a URL in quotes, not {value}",
    "url_parsing": "{value} is not a URL: write the scheme and host, as in http://127.0.0.1:8080/health",
    "url_scheme": "{value} must start with http:// or https://",
    "url_too_long": "is too long for a URL",
}
_KINDS = {"int_type": int, "int_parsing": int, "bool_type": bool, "bool_parsing": bool}


def _message(err: ErrorDetails, model: type[BaseModel]) -> str:
    kind = err["type"]
    if kind == "extra_forbidden":
        return _unknown_key(model, err["loc"])
    if kind == "missing":
        return "required key is missing"
    if kind == "union_tag_invalid":
        tag = err.get("ctx", {}).get("tag")
        return f"unknown check type {tag!r} (known: {', '.join(PROBES)})"
    if kind == "union_tag_not_found":
        return f"type is missing (one of: {', '.join(PROBES)})"
    if kind in _WORDS:
        value = err.get("input")
        ctx = {k: f"{v:g}" if isinstance(v, float) else v for k, v in (err.get("ctx") or {}).items() if k != "error"}
        if kind == "string_pattern_mismatch" and ctx.get("pattern") == NAME_PATTERN:
            return f"{_toml(value)} is not a name: use letters, digits, _ . - (at most 63, the first a letter or digit)"
        if kind == "string_too_short" and isinstance(least := ctx.get("min_length"), int) and least > 1:
            return f"must be at least {ctx['min_length']} characters long"
        text = _WORDS[kind].format(value=_toml(value), input=value, **ctx)
        key = next((p for p in reversed(err["loc"]) if isinstance(p, str)), "")
        return text + (_unquote(key, value, _KINDS[kind]) if kind in _KINDS else "")
    msg = err["msg"]
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            msg = msg[len(prefix) :]
    return msg.replace("Input should be", "must be")


def _node(loc: tuple[Any, ...], data: Any) -> Any:
    """The part of the user's data at `loc`, stepping over union tags as _path does."""
    node = data
    for part in loc:
        if isinstance(part, int) and isinstance(node, list) and part < len(node):
            node = node[part]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        elif not (isinstance(node, dict) and node.get("type") == part):
            return None
    return node


def errors_of(exc: ValidationError, data: Any, model: type[BaseModel] | None = None) -> list[str]:
    model = model or full_config()
    out = []
    for err in exc.errors(include_url=False):
        loc = err["loc"]
        if err["type"] in ("union_tag_invalid", "union_tag_not_found"):
            loc = (*loc, "type")
        message = _message(err, model)
        # A rule spanning several keys (a model validator) names its key as "key: message"; when the
        # user wrote that key, the error points at it.
        key, sep, rest = message.partition(": ")
        node = _node(loc, data) if err["type"] == "value_error" and sep and key.isidentifier() else None
        if isinstance(node, dict) and key in node:
            loc, message = (*loc, key), rest
        out.append(f"{_path(loc, data)}: {message}")
    return out


@functools.cache
def config_model(types: frozenset[str]) -> type[Config]:
    """Config with its checks' union narrowed to `types`: only their models are built, their modules loaded.

    Validation is the same as Config's for a file naming only these types; a type outside the registry is
    still refused with the full list of known ones (_message reads the registry, not the union).
    """
    if types >= frozenset(PROBES):
        return full_config()
    union = check_union(tuple(t for t in PROBES if t in types))
    field = Config.model_fields["checks"]
    return type("Config", (Config,), {
        "__module__": __name__, "__qualname__": "Config",
        # a union built at run time, from the registry: no type a checker could read
        "__annotations__": {"checks": list[union]},  # type: ignore[valid-type]
        "checks": Field(default_factory=list, validate_default=True, description=field.description,
                        json_schema_extra=field.json_schema_extra),
    })


def full_config() -> type[Config]:
    """Config with every check type: for the schema, and for a file naming none it knows."""
    if not Config.__pydantic_complete__:
        # Config's `checks` names CheckConfig, which exists only here: building the union of all 17 models
        # (and importing their modules) waits until something needs every type.
        Config.model_rebuild(_types_namespace={"CheckConfig": check_union(tuple(PROBES))})
    return Config


def named_types(data: Any) -> frozenset[str]:
    """The known check types a parsed file names; all of them when it names none (it will be refused)."""
    checks = data.get("checks") if isinstance(data, dict) else None
    named = frozenset(c.get("type") for c in checks if isinstance(c, dict)) if isinstance(checks, list) else frozenset()
    found = frozenset(t for t in named if isinstance(t, str) and t in PROBES)
    return found or frozenset(PROBES)


def parse_config(data: dict[str, Any], source: str = "<config>") -> Config:
    model = config_model(named_types(data))
    try:
        cfg = model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(source, errors_of(e, data, model)) from None
    seen: dict[str, int] = {}
    errors = []
    for i, check in enumerate(cfg.checks):
        if check.name in seen:
            errors.append(f"checks[{i}] ({check.name}).name: duplicate check name {check.name!r} (first at checks[{seen[check.name]}])")
        seen.setdefault(check.name, i)
    errors += group_errors(cfg)
    if errors:
        raise ConfigError(source, errors)
    return cfg


def group_errors(cfg: Config) -> list[str]:
    """Groups name existing checks, and share one namespace with them (/health/<name> serves either)."""
    errors = []
    names = {c.name for c in cfg.checks}
    for group, g in cfg.groups.items():
        if not re.fullmatch(NAME_PATTERN, group):
            errors.append(f"groups.{group}: a group name is letters, digits, _ . - (at most 63)")
        elif group in names:
            errors.append(f"groups.{group}: a check has the same name; /health/{group} would be ambiguous")
        for i, name in enumerate(g.checks):
            if name not in names:
                errors.append(f"groups.{group}.checks[{i}]: no check named {name!r}")
    return errors


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read, parse and validate a TOML file; every problem becomes a ConfigError, never a traceback."""
    source = str(path)
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigError(source, ["(file): no such file"]) from None
    except IsADirectoryError:
        raise ConfigError(source, ["(file): is a directory, not a config file"]) from None
    except OSError as e:
        raise ConfigError(source, [f"(file): cannot read: {e.strerror}"]) from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(source, [f"(file): not UTF-8 text at byte {e.start}"]) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(source, [f"(toml): {e}"]) from None
    return parse_config(data, source)


def check_definition_name(name: str) -> str:
    """The definition name an editor shows for a check type's table: agent__probes__listen_queue__Config
    becomes ListenQueueCheck (every probe module's model is called Config, so pydantic spells out the
    module); the other definitions keep their own names."""
    parts = name.split("__")
    if len(parts) == 4 and parts[:2] == ["agent", "probes"] and parts[3] == "Config":
        return "".join(word.capitalize() for word in parts[2].split("_")) + "Check"
    return name


def json_schema() -> dict[str, Any]:
    schema = TypeAdapter(full_config()).json_schema(mode="validation")
    names = {old: check_definition_name(old) for old in schema.get("$defs", {})}
    text = json.dumps(schema)
    for old, new in names.items():
        if old != new:
            text = text.replace(f'"#/$defs/{old}"', f'"#/$defs/{new}"')
    schema = dict(json.loads(text))
    schema["$defs"] = {names[k]: v for k, v in schema.get("$defs", {}).items()}
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "healthgate configuration"
    return schema

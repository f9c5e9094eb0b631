"""The [fleet] table: the shared store, the group, the budget of nodes that may be down, and the timings."""

from __future__ import annotations

import re
import socket
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import Field, ValidationInfo, field_validator, model_validator

from agent.fields import DAY, HOUR, Duration, Strict, format_duration
from agent.fleet.budget import MaxDown, parse_max_down
from agent.probes.common import unique, url_secrets

GROUP_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"
NODE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,252}$"
SCHEMES = {"redis": "redis", "rediss": "redis", "unix": "redis", "etcd": "etcd"}


def _host_name() -> str:
    name = socket.gethostname() or "node"
    return re.sub(r"[^A-Za-z0-9_.:-]", "-", name)[:253]


class FleetConfig(Strict):
    """Without this table the agent decides alone; with it, a node down only for shared reasons sheds only
    while its group keeps `size - max_down` members serving."""

    store: str = Field(min_length=1, repr=False, description="the store the group shares: redis://[:password@]host:port/db, "
                       "rediss:// (TLS), unix:///path?db=0, or etcd://host:port (the v3 JSON gateway)")
    group: str = Field(default="default", pattern=GROUP_PATTERN, description="nodes with the same store and group "
                       "share one budget")
    node: str = Field(default_factory=_host_name, pattern=NODE_PATTERN, description="this node's name in the "
                      "group (default: the host name)")
    max_down: int | str = Field(default="30%", description='at most this share of the group ("30%") or this many '
                                "nodes (a number) down for shared reasons; 0 = never shed for a shared reason")
    size: int | None = Field(default=None, ge=1, le=1_000_000, description="the expected group size; default: "
                             "the members seen within `window`; when set, the larger of the two")
    on_store_error: Literal["serve", "shed"] = Field(default="serve", description="the store unreachable for "
                                                     "`grace`: serve (shared reasons stop shedding) or shed")
    heartbeat: Annotated[float, Duration(HOUR, positive=True)] = Field(
        default=1.0, description="how often this node beats into the store")
    ttl: Annotated[float, Duration(HOUR, positive=True)] = Field(
        default=5.0, description="a member silent this long counts as not serving; this "
        "node's own grant lapses locally sooner than that when the store stops answering")
    timeout: Annotated[float, Duration(HOUR, positive=True)] = Field(
        default=0.5, description="every store call is abandoned after this")
    grace: Annotated[float, Duration(HOUR)] = Field(
        default=5.0, description="the store unreachable this long: on_store_error applies")
    min_hold: Annotated[float, Duration(HOUR)] = Field(
        default=10.0, description="a grant is kept at least this long while its "
        "reason lasts (released at once when the reason clears); re-checked after that")
    jitter: Annotated[float, Duration(HOUR)] = Field(
        default=0.5, description="a request for a grant waits a random 0..jitter first, "
        "so a group failing together does not ask in lockstep")
    window: Annotated[float, Duration(DAY, positive=True)] = Field(
        default=600.0, description="members seen within this long make the expected "
        "size; a member that stopped beating counts as not serving for this long")

    @field_validator("store")
    @classmethod
    def _store_url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in SCHEMES:
            raise ValueError("must be a redis://, rediss://, unix:// or etcd:// URL")
        if parts.scheme == "etcd":
            if parts.username or parts.password:
                raise ValueError("etcd authentication is not supported yet: leave user:password out of the URL")
            if not parts.hostname or parts.path not in ("", "/"):
                raise ValueError("an etcd URL is etcd://HOST:PORT")
            try:
                parts.port  # noqa: B018 - raises on a bad port
            except ValueError:
                raise ValueError("the etcd URL's port is not a number in 0-65535") from None
        elif parts.scheme != "unix" and not parts.hostname:
            raise ValueError("a redis URL needs a host: redis://HOST:PORT/DB")
        return v

    @field_validator("max_down", mode="before")
    @classmethod
    def _max_down(cls, v: object) -> object:
        parse_max_down(v)  # raises ValueError in the user's words
        return v

    @field_validator("ttl")
    @classmethod
    def _ttl_above_heartbeat(cls, v: float, info: ValidationInfo) -> float:
        beat = info.data.get("heartbeat")
        if beat is not None and v < 2 * beat:
            raise ValueError(f"must be at least twice heartbeat ({format_duration(beat)}), or one late beat "
                             "makes a live member look dead")
        return v

    @model_validator(mode="after")
    def _timeout_below_heartbeat(self) -> FleetConfig:
        if self.timeout >= self.heartbeat:
            raise ValueError(f"timeout: must be shorter than heartbeat ({format_duration(self.heartbeat)})")
        return self

    @property
    def backend(self) -> str:
        return SCHEMES[urlsplit(self.store).scheme]

    @property
    def rule(self) -> MaxDown:
        return parse_max_down(self.max_down)

    @property
    def store_display(self) -> str:
        """The store URL without its password, for logs and `fleet status`."""
        parts = urlsplit(self.store)
        if parts.password is None:
            return self.store
        netloc = parts.netloc.rpartition("@")[2]
        user = f"{parts.username}:***@" if parts.username else ":***@"
        return parts._replace(netloc=user + netloc).geturl()

    def secrets(self) -> tuple[str, ...]:
        return unique(url_secrets(self.store))

    def for_verdict_group(self, name: str) -> FleetConfig:
        """This table for one verdict group's own guard: the same store, node and rules, with the budget
        counted apart, under scope_group(group, name)."""
        return self.model_copy(update={"group": scope_group(self.group, name)})


def scope_group(fleet_group: str, verdict_group: str) -> str:
    """The store's group for a verdict group's budget: `web:api`. ':' is in neither a fleet group's name
    (GROUP_PATTERN) nor a verdict group's, so no configured fleet group can share it, and no store key
    of `web` is a prefix of it (etcd ranges over /healthgate/fleet/web/)."""
    return f"{fleet_group}:{verdict_group}"

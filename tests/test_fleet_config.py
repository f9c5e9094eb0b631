"""The [fleet] table: defaults, the store password as a secret, and no [fleet] meaning no guard."""

from __future__ import annotations

import json
import logging

from agent import logs
from agent.config import json_schema, parse_config
from tests.helpers import PASSING

PASSWORD = "Fl33t-pa55:w/rd"


def test_without_fleet_there_is_no_guard() -> None:
    """A config without [fleet] has fleet = None: nothing changes for it."""
    assert parse_config({"checks": [PASSING]}).fleet is None


def test_defaults_are_documented_values() -> None:
    """Only the store is required; the rest defaults as the reference says."""
    fleet = parse_config({"fleet": {"store": "etcd://127.0.0.1:2379"}, "checks": [PASSING]}).fleet
    assert fleet is not None and fleet.backend == "etcd"
    assert (fleet.group, fleet.max_down, fleet.size, fleet.on_store_error) == ("default", "30%", None, "serve")
    assert (fleet.heartbeat, fleet.ttl, fleet.timeout, fleet.grace, fleet.min_hold, fleet.jitter, fleet.window) == (
        1.0, 5.0, 0.5, 5.0, 10.0, 0.5, 600.0)
    assert fleet.node  # the host name


def test_store_password_is_a_secret_masked_in_logs(capsys) -> None:
    """The store URL's password (as written and percent-decoded) is among the config's secrets, is
    masked in every log line, and is absent from the URL as displayed and from the config's repr."""
    encoded = PASSWORD.replace(":", "%3A").replace("/", "%2F")
    cfg = parse_config({"fleet": {"store": f"redis://:{encoded}@127.0.0.1:6379/0"}, "checks": [PASSING]})
    assert PASSWORD in cfg.secrets() and encoded in cfg.secrets()
    assert PASSWORD not in cfg.fleet.store_display and encoded not in cfg.fleet.store_display
    assert encoded not in repr(cfg)
    logs.setup("info", cfg.secrets())
    try:
        logs.event("fleet_store_error", logging.WARNING, store=cfg.fleet.store, error=f"auth {PASSWORD}")
        err = capsys.readouterr().err
    finally:
        logs.setup("info")
    assert PASSWORD not in err and encoded not in err and "***" in err


def test_scope_is_in_the_schema() -> None:
    """`healthgate schema` shows the fleet table and every check's scope key."""
    text = json.dumps(json_schema())
    assert "on_store_error" in text and '"scope"' in text

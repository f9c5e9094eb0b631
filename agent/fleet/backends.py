"""open_store(cfg): the store client of the backend a [fleet] config names, its library imported only then."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from agent.fleet.config import FleetConfig
    from agent.fleet.store import Store


def open_store(cfg: FleetConfig) -> Store:
    if cfg.backend == "etcd":
        from agent.fleet.etcd import EtcdStore

        return EtcdStore(cfg)
    from agent.fleet.redis import RedisStore

    return RedisStore(cfg)

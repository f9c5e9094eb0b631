"""Structured logging: one JSON object per line on stderr, with secrets masked."""

from __future__ import annotations

import json
import logging
import sys
import time

from agent.text import mask_all

log = logging.getLogger("healthgate")


class JsonFormatter(logging.Formatter):
    def __init__(self, secrets: tuple[str, ...] = ()):
        super().__init__()
        self.secrets = secrets

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "event": record.getMessage(),
        }
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        # Masked before serialising: json.dumps escapes a secret holding `"`, `\\` or non-ASCII.
        return json.dumps(mask_all(entry, self.secrets, default=str), default=str)


def setup(level: str = "info", secrets: tuple[str, ...] = ()) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(secrets))
    log.handlers[:] = [handler]
    log.setLevel(level.upper())
    log.propagate = False


def set_secrets(secrets: tuple[str, ...]) -> None:
    for h in log.handlers:
        if isinstance(h.formatter, JsonFormatter):
            h.formatter.secrets = secrets


def event(_event: str, _level: int = logging.INFO, /, **fields: object) -> None:
    log.log(_level, _event, extra={"fields": fields})

"""Shared config field types: strict models, durations, listen addresses."""

from __future__ import annotations

import math
import re
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, PlainSerializer, WithJsonSchema

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(value: Any) -> float:
    """Seconds from a number or a string such as "500ms", "1.5s", "2m", "1h"."""
    if isinstance(value, bool):
        raise ValueError("must be a duration such as 500ms, 2s or 1m, not a boolean")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        m = _DURATION.match(value)
        if not m:
            raise ValueError(f"{value!r} is not a duration: use a number of seconds or 500ms, 2s, 1m, 1h")
        seconds = float(m.group(1)) * _UNIT[m.group(2)]
    else:
        raise ValueError("must be a duration such as 500ms, 2s or 1m")
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError("must be a non-negative duration")
    return seconds


def format_duration(seconds: float) -> str:
    if seconds == 0:
        return "0s"
    if seconds < 1:
        return f"{seconds * 1000:g}ms"
    if seconds < 60 or seconds % 60:
        return f"{seconds:g}s"
    if seconds % 3600 == 0:
        return f"{seconds / 3600:g}h"
    return f"{seconds / 60:g}m"


Duration = Annotated[
    float,
    BeforeValidator(parse_duration),
    PlainSerializer(format_duration, return_type=str),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "number", "minimum": 0},
                {"type": "string", "pattern": _DURATION.pattern},
            ],
            "description": "seconds, or a string with ms / s / m / h",
        }
    ),
]


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKMGTP]i?)?B?\s*$")
_SIZE_UNIT = {None: 1, "k": 1000, "K": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4, "P": 1000**5,
              "Ki": 1024, "Mi": 1024**2, "Gi": 1024**3, "Ti": 1024**4, "Pi": 1024**5}


def parse_size(value: Any) -> int:
    """Bytes from a number or a string such as "512MiB", "512Mi", "1.5GB", "10G" (G = 10^9, Gi = 2^30)."""
    if isinstance(value, bool):
        raise ValueError("must be a size such as 512MiB or 2GB, not a boolean")
    if isinstance(value, int | float):
        size = float(value)
    elif isinstance(value, str):
        m = _SIZE.match(value)
        if not m or m.group(2) == "ki":
            raise ValueError(f"{value!r} is not a size: use a number of bytes or 512MiB, 2GiB, 500MB, 1GB")
        size = float(m.group(1)) * _SIZE_UNIT[m.group(2)]
    else:
        raise ValueError("must be a size such as 512MiB or 2GB")
    if not math.isfinite(size) or size < 0:
        raise ValueError("must be a non-negative size")
    return int(size)


def format_size(size: int) -> str:
    exact = []
    for unit in ("PiB", "TiB", "GiB", "MiB", "KiB", "PB", "TB", "GB", "MB", "kB"):
        scale = _SIZE_UNIT[unit.removesuffix("B")]
        if size >= scale and size % scale == 0:
            exact.append(f"{size // scale}{unit}")
    return min(exact, key=len, default=str(size))


def human_size(size: float) -> str:
    """A size for people: 1.5 GiB, 12 MiB, 512 B."""
    for unit in ("PiB", "TiB", "GiB", "MiB", "KiB"):
        scale = _SIZE_UNIT[unit[:2]]
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size:.0f} B"


ByteSize = Annotated[
    int,
    BeforeValidator(parse_size),
    PlainSerializer(format_size, return_type=str),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "integer", "minimum": 0},
                {"type": "string", "pattern": _SIZE.pattern},
            ],
            "description": "bytes, or a string with kB/MB/GB/TB (powers of 1000) or KiB/MiB/GiB/TiB (powers of 1024)",
        }
    ),
]


def parse_listen(value: Any) -> tuple[str, int]:
    """("host", port) from "host:port", "[::1]:port" or ":port" (all interfaces)."""
    if isinstance(value, tuple | list) and len(value) == 2:
        host, port = value
    elif isinstance(value, str):
        host, sep, port = value.rpartition(":")
        if not sep:
            raise ValueError(f"{value!r} must be HOST:PORT, for example 127.0.0.1:8080 or [::]:8080")
        host = host.strip("[]") or "0.0.0.0"
    else:
        raise ValueError("must be a string HOST:PORT")
    try:
        port = int(port)
    except (TypeError, ValueError):
        raise ValueError(f"port {port!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} is out of range (0-65535)")
    return str(host), port


def format_listen(addr: tuple[str, int]) -> str:
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


Listen = Annotated[
    tuple[str, int],
    BeforeValidator(parse_listen),
    PlainSerializer(format_listen, return_type=str),
    WithJsonSchema({"type": "string", "description": "HOST:PORT, [IPv6]:PORT or :PORT"}),
]


class Strict(BaseModel):
    """Every config model: unknown keys rejected, immutable once loaded."""

    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)

"""Shared config field types: strict models, durations, sizes, listen addresses, paths, regexes."""

from __future__ import annotations

import ipaddress
import math
import re
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    WithJsonSchema,
)

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKMGTP]i?)?B?\s*$")
_SIZE_UNIT = {None: 1, "k": 1000, "K": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4, "P": 1000**5,
              "Ki": 1024, "Mi": 1024**2, "Gi": 1024**3, "Ti": 1024**4, "Pi": 1024**5}


def _quantity(value: Any, pattern: re.Pattern[str], units: dict[str | None, float], what: str, unit: str,
              hint: str) -> float:
    """A number of `unit`, or a string of a number and a unit known to `units`; a ValueError in the user's words."""
    if isinstance(value, bool):
        raise ValueError(f"must be a {what} such as {hint}, not a boolean")
    if isinstance(value, int | float):
        amount = float(value)
    elif isinstance(value, str):
        m = pattern.match(value)
        if not m or m.group(2) not in units:
            raise ValueError(f"{value!r} is not a {what}: use a number of {unit} or {hint}")
        amount = float(m.group(1)) * units[m.group(2)]
    else:
        raise ValueError(f"must be a {what} such as {hint}")
    if not math.isfinite(amount) or amount < 0:
        raise ValueError(f"must be a non-negative {what}")
    return amount


def _with_units(base: type, parse: Any, render: Any, pattern: re.Pattern[str], description: str) -> Any:
    """A config field type read from a number or a string with a unit, and written back as a string."""
    return Annotated[
        base,
        BeforeValidator(parse),
        PlainSerializer(render, return_type=str),
        WithJsonSchema(
            {
                "anyOf": [{"type": "number", "minimum": 0}, {"type": "string", "pattern": pattern.pattern}],
                "description": description,
            }
        ),
    ]


def parse_duration(value: Any) -> float:
    """Seconds from a number (of seconds) or a string such as "500ms", "1.5s", "2m", "1h"."""
    return _quantity(value, _DURATION, _UNIT, "duration", "seconds", "500ms, 2s, 1m, 1h")


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


Duration = _with_units(float, parse_duration, format_duration, _DURATION, "seconds, or a string with ms / s / m / h")


def parse_size(value: Any) -> int:
    """Bytes from a number (of bytes) or a string such as "512MiB", "512Mi", "1.5GB", "10G" (G = 10^9, Gi = 2^30)."""
    return int(_quantity(value, _SIZE, _SIZE_UNIT, "size", "bytes", "512MiB, 2GiB, 500MB, 1GB"))


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


ByteSize = _with_units(int, parse_size, format_size, _SIZE,
                       "bytes, or a string with kB/MB/GB/TB (powers of 1000) or KiB/MiB/GiB/TiB (powers of 1024)")


def _absolute(value: str) -> str:
    if not value.startswith("/"):
        raise ValueError(f"{value!r} must be an absolute path")
    return value


def _regex(value: str) -> str:
    try:
        re.compile(value)
    except re.error as e:
        raise ValueError(f"not a regular expression: {e}") from None
    return value


AbsolutePath = Annotated[str, Field(min_length=1), AfterValidator(_absolute)]
Regex = Annotated[str, Field(min_length=1), AfterValidator(_regex)]


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


def parse_network(value: Any) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """An address block from "10.0.0.0/8", "2001:db8::/32" or one address ("127.0.0.1" = /32)."""
    if not isinstance(value, str):
        raise ValueError("must be a string such as 10.0.0.0/8 or ::1")
    try:
        return ipaddress.ip_network(value)
    except ValueError as e:
        raise ValueError(f"{value!r} is not a network: {e}") from None


Network = Annotated[
    ipaddress.IPv4Network | ipaddress.IPv6Network,
    BeforeValidator(parse_network),
    PlainSerializer(str, return_type=str),
    WithJsonSchema({"type": "string", "description": "an address or a CIDR block: 10.0.0.0/8, ::1"}),
]


class Strict(BaseModel):
    """Every config model: unknown keys rejected, immutable once loaded."""

    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)

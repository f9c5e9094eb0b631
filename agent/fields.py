"""Shared config field types: strict models, durations, sizes, listen addresses, paths, regexes."""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from typing import Annotated, Any

from annotated_types import GroupedMetadata
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    WithJsonSchema,
    model_validator,
)

_DURATION = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h)?\s*$")
_UNIT = {"ms": Fraction(1, 1000), "s": Fraction(1), "m": Fraction(60), "h": Fraction(3600), None: Fraction(1)}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([kKMGTP]i?)?B?\s*$")
_SIZE_UNIT = {None: 1, "k": 1000, "K": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4, "P": 1000**5,
              "Ki": 1024, "Mi": 1024**2, "Gi": 1024**3, "Ti": 1024**4, "Pi": 1024**5}
HOUR, DAY, YEAR = 3600, 86400, 365 * 86400


def _quantity(value: Any, pattern: re.Pattern[str], units: dict[str | None, Any], what: str, unit: str,
              hint: str) -> Fraction | float:
    """A number of `unit`, or a string of a number and a unit known to `units`; a ValueError in the user's words.

    A string is converted exactly (a Fraction), so "86400000ms" is exactly "24h" when held against a bound."""
    if isinstance(value, bool):
        raise ValueError(f"must be a {what} such as {hint}, not a boolean")
    amount: Fraction | float
    if isinstance(value, int | float):
        amount = value if isinstance(value, float) else Fraction(value)
    elif isinstance(value, str):
        m = pattern.match(value)
        if not m or m.group(2) not in units:
            raise ValueError(f"{value!r} is not a {what}: use a number of {unit} or {hint}")
        amount = Fraction(m.group(1)) * units[m.group(2)]
    else:
        raise ValueError(f"must be a {what} such as {hint}")
    if (isinstance(amount, float) and not math.isfinite(amount)) or amount < 0:
        raise ValueError(f"must be a non-negative {what}")
    return amount


def parse_duration(value: Any) -> float:
    """Seconds from a number (of seconds) or a string such as "500ms", "1.5s", "2m", "1h"."""
    return float(_quantity(value, _DURATION, _UNIT, "duration", "seconds", "500ms, 2s, 1m, 1h"))


def bounded_duration(value: Any, maximum: int, positive: bool = False) -> float:
    """parse_duration, then held against its bounds exactly: at most `maximum` seconds, more than 0 if `positive`."""
    amount = _quantity(value, _DURATION, _UNIT, "duration", "seconds", "500ms, 2s, 1m, 1h")
    if positive and amount == 0:
        raise ValueError("must be longer than 0s")
    if amount > maximum:
        raise ValueError(f"must be at most {format_duration(maximum)}")
    return float(amount)


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


def _below(n: int) -> str:
    """A regex for the integers 0 .. n-1 written without leading zeros (n >= 1)."""
    digits = str(n - 1)
    alts = ["0"]
    if len(digits) > 1:
        alts.append(f"[1-9][0-9]{{0,{len(digits) - 2}}}" if len(digits) > 2 else "[1-9]")
    for i, d in enumerate(digits):  # same length as n-1: a smaller digit at i after the same prefix
        low = 1 if i == 0 else 0
        if int(d) > low:
            rest = len(digits) - i - 1
            alts.append(digits[:i] + f"[{low}-{int(d) - 1}]" + (f"[0-9]{{{rest}}}" if rest else ""))
    if digits != "0":
        alts.append(digits)
    return "(?:" + "|".join(dict.fromkeys(alts)) + ")"


def duration_pattern(maximum: int, positive: bool = False) -> str:
    """The JSON Schema pattern of a duration string between its bounds: what bounded_duration accepts.

    JSON Schema cannot compare the number inside a string, so the bound is spelled out per unit: at most
    N of that unit is any whole number below N with any fraction, or N itself with a zero fraction. It
    needs `maximum` to be whole hours, so that N is a whole number in every unit."""
    if maximum % HOUR:
        raise ValueError("a duration's maximum must be whole hours")
    forms = []
    for unit, tail in (("ms", "ms"), ("s", "s?"), ("m", "m"), ("h", "h")):
        n = maximum // _UNIT[unit] if unit != "ms" else maximum * 1000
        forms.append(rf"0*(?:{_below(int(n))}(?:\.[0-9]+)?|{int(n)}(?:\.0+)?)\s*{tail}")
    zero = r"(?!\s*0*(?:\.0+)?\s*(?:ms|s|m|h)?\s*$)" if positive else ""
    return rf"^{zero}\s*(?:{'|'.join(forms)})\s*$"


@dataclass(frozen=True, slots=True)
class Duration(GroupedMetadata):
    """A duration field, `Annotated[float, Duration(HOUR)]`: seconds from a number or a string with
    ms / s / m / h, at most `maximum` seconds (whole hours), more than 0 when `positive`; written back as a
    string, and the JSON schema says exactly the same. The bounds live in the metadata, not in a type made
    by a call, so a type checker reads the field as the float it is."""

    maximum: int
    positive: bool = False

    def __iter__(self) -> Iterator[object]:
        maximum, positive = self.maximum, self.positive
        bound = {"exclusiveMinimum": 0} if positive else {"minimum": 0}
        words = ("more than 0" if positive else "0") + f" to {format_duration(maximum)}"
        yield BeforeValidator(lambda v: bounded_duration(v, maximum, positive))
        yield PlainSerializer(format_duration, return_type=str)
        yield WithJsonSchema({"anyOf": [{"type": "number", **bound, "maximum": maximum},
                                        {"type": "string", "pattern": duration_pattern(maximum, positive)}],
                              "description": f"seconds, or a string with ms / s / m / h; {words}"})


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


# A size field: bytes from a number or a string with a unit, written back as a string.
ByteSize = Annotated[
    int, BeforeValidator(parse_size), PlainSerializer(format_size, return_type=str), WithJsonSchema({
        "anyOf": [{"type": "number", "minimum": 0}, {"type": "string", "pattern": _SIZE.pattern}],
        "description": "bytes, or a string with kB/MB/GB/TB (powers of 1000) or KiB/MiB/GiB/TiB (powers of 1024)"}),
]


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


AbsolutePath = Annotated[str, Field(min_length=1, json_schema_extra={"pattern": "^/"}), AfterValidator(_absolute)]
Regex = Annotated[str, Field(min_length=1), AfterValidator(_regex)]


def parse_listen(value: Any) -> tuple[str, int]:
    """("host", port) from "host:port", "[::1]:port" or ":port" (all interfaces).

    Only the string form: it is the one the schema and docs/configuration.md document, and a second spelling
    (a [host, port] array) would be one more thing a config could mean without anyone having said so."""
    if not isinstance(value, str):
        raise ValueError("must be a string HOST:PORT, for example \"127.0.0.1:8080\"")
    host, sep, port_text = value.strip().rpartition(":")
    if not sep:
        raise ValueError(f"{value!r} must be HOST:PORT, for example 127.0.0.1:8080 or [::]:8080")
    host = host.strip("[]") or "0.0.0.0"
    if not port_text.isascii() or not port_text.isdigit():
        raise ValueError(f"port {port_text!r} is not a number")
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} is out of range (0-65535)")
    return host, port


def format_listen(addr: tuple[str, int]) -> str:
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


Listen = Annotated[
    tuple[str, int],
    BeforeValidator(parse_listen),
    PlainSerializer(format_listen, return_type=str),
    WithJsonSchema({"type": "string", "pattern": rf"^[\s\S]*:0*{_below(65536)}\s*$",
                    "description": "HOST:PORT, [IPv6]:PORT or :PORT"}),
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
    """Every config model: unknown keys rejected, immutable once loaded, and no value coerced into another
    type ("yes" is not a boolean, "5" not a number): what validates is what the JSON schema describes."""

    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True, strict=True)

    @model_validator(mode="before")
    @classmethod
    def _whole_numbers(cls, data: Any) -> Any:
        # JSON Schema's "integer" is any number without a fraction, 2.0 included (and TOML writes 2.0 as a
        # float): take it as the integer it is, as the schema does.
        if not isinstance(data, dict):
            return data
        return {k: int(v) if isinstance(v, float) and v.is_integer() and k in cls.model_fields
                and cls.model_fields[k].annotation in (int, int | None) else v for k, v in data.items()}

"""Text that leaves the agent: secrets masked in any structure, outside text made one printable line."""

from __future__ import annotations

import math
import re
import unicodedata
from typing import Any

REASON_MAX = 1024  # characters of a reason kept; a dependency's error text has no other bound
_SPACE = re.compile(r"\s+")


def mask(text: str, secrets: tuple[str, ...]) -> str:
    for s in secrets:
        if s:
            text = text.replace(s, "***")
    return text


def mask_all(obj: Any, secrets: tuple[str, ...], default: Any = None) -> Any:
    """`obj` with every string in it (dict keys too) masked, before anything serialises it: after
    json.dumps a secret holding `"`, `\\` or non-ASCII is escaped and no longer matches. `default` turns
    any other leaf into something serialisable (str for a log line), so that text is masked too."""
    if not secrets:
        return obj
    if isinstance(obj, str):
        return mask(obj, secrets)
    if isinstance(obj, dict):
        return {mask_all(k, secrets, default): mask_all(v, secrets, default) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [mask_all(v, secrets, default) for v in obj]
    if default is not None and not isinstance(obj, int | float | bool | type(None)):
        return mask_all(default(obj), secrets)
    return obj


def _visible(c: str) -> str:
    if unicodedata.category(c)[0] == "C" or c in "\u2028\u2029":  # controls, format (bidi overrides), unassigned
        return f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}"
    return c


def one_line(text: str, limit: int = REASON_MAX) -> str:
    """One line of printable text: runs of white space become one space, any other control or format
    character (ESC, BEL, a bidi override) is shown as an escape, so it does nothing on a terminal."""
    text = _SPACE.sub(" ", text)
    if not text.isprintable():  # str.isprintable() is False for every character _visible() changes
        text = "".join(_visible(c) for c in text)
    text = text.strip()
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


def printable(text: str) -> str:
    """For a renderer: `text` with every control or format character escaped, line breaks included."""
    return "".join(_visible(c) for c in text)


def tidy(x: float) -> float:
    """A measured number without float noise: six significant digits, or millisecond precision from 1000 on
    (a Unix timestamp keeps its milliseconds). 37.58291015625 -> 37.5829, 0.000123456789 -> 0.000123457."""
    if not isinstance(x, float) or not math.isfinite(x):
        return x
    return round(x, 3) if abs(x) >= 1000 else float(f"{x:.6g}")


def tidy_all(obj: Any) -> Any:
    """`obj` with every float in it tidied, for JSON that people read."""
    if isinstance(obj, float):
        return tidy(obj)
    if isinstance(obj, dict):
        return {k: tidy_all(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [tidy_all(v) for v in obj]
    return obj

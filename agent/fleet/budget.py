"""The budget arithmetic, pure: expected size, how many may be down, whether one more may shed."""

from __future__ import annotations

import re
from dataclasses import dataclass

BPS = 10_000  # a share is held in basis points, so Python and the store's script compute the same integers
_SHARE = re.compile(r"^\s*(\d{1,3}(?:\.\d{1,2})?)\s*%\s*$")


@dataclass(frozen=True, slots=True)
class MaxDown:
    """At most `count` nodes, or at most `bps`/10000 of the expected size (rounded down), may be down."""

    count: int | None = None
    bps: int | None = None

    def __str__(self) -> str:
        return str(self.count) if self.count is not None else f"{(self.bps or 0) / 100:g}%"


def parse_max_down(value: object) -> MaxDown:
    if isinstance(value, bool):
        raise ValueError('must be a share such as "30%" or a number of nodes, not a boolean')
    if isinstance(value, int):
        if value < 0:
            raise ValueError("must be a non-negative number of nodes")
        return MaxDown(count=value)
    if isinstance(value, str):
        if value.strip().isdigit():
            return MaxDown(count=int(value))
        m = _SHARE.match(value)
        if m:
            bps = round(float(m.group(1)) * 100)
            if bps > BPS:
                raise ValueError(f"{value!r} is more than 100%")
            return MaxDown(bps=bps)
    raise ValueError(f'{value!r} is not a share or a count: use "30%" (up to two decimals) or a number of nodes')


def expected_size(size: int | None, seen: int) -> int:
    """The group's expected size: the configured size, raised to the members seen lately if more showed up."""
    return max(size or 0, seen)


def allowed_down(rule: MaxDown, expected: int) -> int:
    """How many of `expected` may be down; a share rounds down, so it is never exceeded."""
    if rule.count is not None:
        return min(rule.count, expected)
    return expected * (rule.bps or 0) // BPS


def min_serving(rule: MaxDown, expected: int) -> int:
    return expected - allowed_down(rule, expected)


def may_shed(rule: MaxDown, expected: int, serving: int) -> int:
    """How many more of the serving members may shed now."""
    return max(0, serving - min_serving(rule, expected))


def grant(rule: MaxDown, expected: int, serving_others: int) -> bool:
    """Whether the asking node may shed: the members serving besides it still make the minimum.

    The asking node is left out whatever it is doing now, so a renewal (a node already down) and a first
    request (a node still serving) obey the same bound: after the grant, `serving_others` serve.
    """
    return serving_others >= min_serving(rule, expected)

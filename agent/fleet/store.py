"""The store a group shares: a Protocol of four calls, the values they exchange, and open_store(cfg).

A backend keeps, per group, which members beat lately (by the store's own clock), which of them serve,
which are down and which of those hold a grant to be down for a shared reason. `beat` and `acquire` are
each ONE atomic step in the store; the bound they keep is budget.grant(): a member may shed only while the
members serving besides it make `expected - allowed_down`. A Kubernetes Lease or Consul backend is one
more module implementing the same four calls.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

if TYPE_CHECKING:
    pass

# What a member does, as recorded in the store: up and held serve; down (local reasons) and shed (a
# grant for shared reasons) do not.
MemberStatus = Literal["up", "held", "down", "shed"]
SERVING: frozenset[str] = frozenset({"up", "held"})


@dataclass(frozen=True, slots=True)
class Report:
    """What a member tells the store: its name, what it does or asks for, why, and since when (wall, display)."""

    node: str
    status: MemberStatus  # "shed" asks to hold a grant; the store answers with the status it recorded
    reasons: tuple[str, ...] = ()
    since: float = 0.0

    def doc(self) -> str:
        return json.dumps({"reasons": list(self.reasons), "since": round(self.since, 3)}, separators=(",", ":"))


@dataclass(frozen=True, slots=True)
class Standing:
    """The store's answer to one call: the status it recorded for the member and the group's figures."""

    status: MemberStatus
    # The group's figures; None when the backend did not read them on this call (an etcd heartbeat is a
    # lease keep-alive only, so a beat costs the store no range read).
    expected: int | None = None  # the group's expected size
    serving: int | None = None  # members serving now, this one included when it serves
    allowed: int | None = None  # how many of `expected` may be down

    @property
    def granted(self) -> bool:
        return self.status == "shed"


@dataclass(frozen=True, slots=True)
class Member:
    """One member as `fleet status` lists it; `alive` False = it stopped beating (counts as not serving)."""

    node: str
    status: MemberStatus
    alive: bool
    reasons: tuple[str, ...] = ()
    since: float | None = None  # wall time of the member's current status, as it reported it
    silent_for: float | None = None  # seconds since its last beat, by the store's clock, when the store knows


@dataclass(frozen=True, slots=True)
class Group:
    members: tuple[Member, ...]
    expected: int
    serving: int
    allowed: int


def parse_doc(text: str | None) -> tuple[tuple[str, ...], float | None]:
    try:
        doc = json.loads(text or "{}")
        return tuple(str(r) for r in doc.get("reasons", ())), float(doc["since"]) if "since" in doc else None
    except (ValueError, TypeError, AttributeError):
        return (), None


class Store(Protocol):
    """Every call may raise (the guard times it out and counts the error); none may block the loop."""

    async def beat(self, report: Report) -> Standing:
        """Refresh the member's liveness and record its status. A "shed" report keeps a grant the store
        still holds for it; one the store lost (a restart, a lapse) is checked again as in acquire()."""
        ...

    async def acquire(self, report: Report) -> Standing:
        """Check-and-grant in one atomic step: record "shed" if the budget allows, else "held"."""
        ...

    async def release(self, report: Report) -> Standing:
        """Drop any grant and record the member's new status ("up" or "down")."""
        ...

    async def members(self) -> Group:
        ...

    async def close(self) -> None:
        ...


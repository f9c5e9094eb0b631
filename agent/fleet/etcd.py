"""The etcd store, over etcd's v3 JSON gateway with aiohttp: leases for liveness, a txn for check-and-grant.

Why the gateway and not a client library: the maintained asyncio client (aetcd) speaks gRPC, which brings
grpcio and protobuf (large native wheels with threads of their own) for the five calls this needs; the
gateway (/v3/kv/range, /v3/kv/txn, /v3/lease/grant, /v3/lease/keepalive, served by every etcd 3.4+ on its
client port) is plain JSON over the aiohttp the agent already runs, and each call is one HTTP request the
guard can time out like any other.

Layout under /healthgate/fleet/<group>/: serving/<node> or down/<node> (exactly one; value: status,
reasons, since) on the member's lease (TTL = ttl, kept alive by each beat: a beat writes nothing), and
seen/<node> on a second lease of TTL = window (the expected size; its value is the last status, so a
member that went silent is still listed). born (no lease) marks when the store first saw the group, and
warmup (a lease of TTL = ttl, made with born) says the group is too new to count: while it lives nothing is
granted, since live members not yet back (a new group, a store that restarted empty) are missing. A grant is down/<node> with status "shed", written by a txn that
compares the down/ prefix unchanged since the counts were read: two nodes granted from the same counts
can't both commit, the loser reads again.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import random
import time
from typing import TYPE_CHECKING, Any

from agent.fleet.budget import allowed_down, expected_size, grant
from agent.fleet.store import SERVING, Group, Member, MemberStatus, Report, Standing, parse_doc

if TYPE_CHECKING:
    import aiohttp

    from agent.fleet.config import FleetConfig

TRIES = 32  # txn attempts before a call gives up as contended (each lost race means another node moved)


class StoreError(Exception):
    pass


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _unb64(text: str) -> str:
    return base64.b64decode(text).decode()


def _prefix_end(prefix: str) -> str:
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


def _range(key: str, prefix: bool = False, **kw: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"key": _b64(key), **kw}
    if prefix:
        body["range_end"] = _b64(_prefix_end(key))
    return {"request_range": body}


class EtcdStore:
    """Store on etcd 3.4+; one instance per member (it owns the member's leases)."""

    def __init__(self, cfg: FleetConfig, session: aiohttp.ClientSession | None = None):
        from urllib.parse import urlsplit

        self.cfg = cfg
        parts = urlsplit(cfg.store)
        host = f"[{parts.hostname}]" if ":" in (parts.hostname or "") else parts.hostname
        self.base = f"http://{host}:{parts.port or 2379}"
        self.root = f"/healthgate/fleet/{cfg.group}/"
        self._session = session
        self._own_session = session is None
        self._lease: str | None = None
        self._seen_lease: str | None = None
        self._seen_kept = 0.0
        self._born_known = False  # the store has the group's born key (checked after each new lease)
        self._written: tuple[str, str] | None = None  # (status, doc) as last written under this lease
        self.calls = 0  # requests sent to the store (the bench's ops per member)

    # -- the gateway ------------------------------------------------------------------------------

    async def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        import aiohttp

        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=4), trust_env=False)
        self.calls += 1
        async with self._session.post(self.base + path, json=body) as resp:
            data = await resp.json(content_type=None)
            if resp.status != 200 or not isinstance(data, dict):
                message = data.get("message") or data.get("error") if isinstance(data, dict) else data
                raise StoreError(f"etcd {path}: HTTP {resp.status}: {message}")
            return data

    async def _txn(self, success: list[dict[str, Any]], compare: list[dict[str, Any]] | None = None) -> dict:
        return await self._post("/v3/kv/txn", {"compare": compare or [], "success": success})

    def _key(self, where: str, node: str) -> str:
        return f"{self.root}{where}/{node}"

    # -- leases -----------------------------------------------------------------------------------

    async def _grant_lease(self, ttl: float) -> str:
        data = await self._post("/v3/lease/grant", {"TTL": max(1, math.ceil(ttl))})
        return str(data["ID"])

    async def _alive(self, lease: str | None) -> bool:
        if lease is None:
            return False
        data = await self._post("/v3/lease/keepalive", {"ID": lease})
        return int(data.get("result", {}).get("TTL", 0)) > 0  # an unknown or expired lease: no TTL

    async def _keepalive(self, node: str) -> bool:
        """Refresh the member's leases; True when they had to be made anew (the store lost this member)."""
        fresh = not await self._alive(self._lease)
        if fresh:
            # A store that lost this lease (it restarted empty) lost the seen lease too: until one call has
            # found that lease alive or made it anew, every beat checks it, so a call lost below is retried.
            self._seen_kept, self._born_known = -math.inf, False
            self._lease, self._written = await self._grant_lease(self.cfg.ttl), None
        if not self._born_known:
            # The group's birth starts its warm-up: mark it when the first member registers, not at the
            # first grant request, or the first outage would wait out a ttl before anyone may shed.
            data = await self._post("/v3/kv/range", {"key": _b64(f"{self.root}born"), "keys_only": True})
            if not data.get("kvs"):
                await self._born()
            self._born_known = True
        now = time.monotonic()
        if fresh or now - self._seen_kept >= self.cfg.window / 4 or self._seen_lease is None:
            if not await self._alive(self._seen_lease):
                self._seen_lease = await self._grant_lease(self.cfg.window)
                self._written = None
            self._seen_kept = now
        return fresh

    async def _write(self, report: Report, status: MemberStatus, compare: list | None = None) -> bool:
        """Record `status` for the member (one key moved, in one txn); False when `compare` failed."""
        doc = json.dumps({"status": status, "reasons": list(report.reasons), "since": round(report.since, 3)},
                         separators=(",", ":"))
        if compare is None and self._written == (status, doc):
            return True
        here, other = ("serving", "down") if status in SERVING else ("down", "serving")
        ops: list[dict[str, Any]] = [{"request_delete_range": {"key": _b64(self._key(other, report.node))}},
               {"request_put": {"key": _b64(self._key(here, report.node)), "value": _b64(doc), "lease": self._lease}},
               {"request_put": {"key": _b64(self._key("seen", report.node)), "value": _b64(doc),
                                "lease": self._seen_lease}}]
        # Until the reply says how it ended, what the store holds is unknown: a write that committed but
        # whose reply was lost must not leave the record before it standing in for the store's.
        self._written = None
        data = await self._txn(ops, compare)
        if not data.get("succeeded", False):
            return False
        self._written = (status, doc)
        return True

    # -- the calls --------------------------------------------------------------------------------

    async def _check(self, report: Report, recheck: bool) -> Standing:
        """Check-and-grant: read the counts at one revision, decide, commit only if no grant or local
        fault was recorded since (the down/ prefix unchanged); otherwise read again."""
        down = f"{self.root}down/"
        for attempt in range(TRIES):
            if attempt:  # another node committed first: step aside a random moment so the retries spread
                await asyncio.sleep(random.uniform(0, min(0.02, 0.002 * attempt)))
            data = await self._txn([_range(f"{self.root}serving/", prefix=True, count_only=True),
                                    _range(f"{self.root}seen/", prefix=True, count_only=True),
                                    _range(self._key("serving", report.node), keys_only=True),
                                    _range(self._key("down", report.node)),
                                    _range(f"{self.root}born", keys_only=True),
                                    _range(f"{self.root}warmup", keys_only=True)])
            rev = int(data["header"]["revision"])
            counts = [r["response_range"] for r in data["responses"]]
            warm = bool(counts[5].get("kvs"))
            if not counts[4].get("kvs"):
                await self._born()
                warm = True
            serving_n, seen_n = int(counts[0].get("count", 0)), int(counts[1].get("count", 0))
            self_serving = bool(counts[2].get("kvs"))
            own_down = counts[3].get("kvs") or []
            holds = bool(own_down) and json.loads(_unb64(own_down[0]["value"])).get("status") == "shed"
            expected = expected_size(self.cfg.size, seen_n)
            allowed = allowed_down(self.cfg.rule, expected)
            others = serving_n - (1 if self_serving else 0)
            if holds and not recheck:
                ok = True
            else:
                ok = not warm and grant(self.cfg.rule, expected, others)
            if not ok:
                await self._write(report, "held")
                return Standing("held", expected, others + 1, allowed)
            if holds and self._written is not None and self._written[0] == "shed":
                return Standing("shed", expected, others, allowed)
            unchanged = [{"key": _b64(down), "range_end": _b64(_prefix_end(down)), "target": "MOD",
                          "result": "LESS", "mod_revision": str(rev + 1)}]
            if await self._write(report, "shed", unchanged):
                return Standing("shed", expected, others, allowed)
        raise StoreError(f"etcd: check-and-grant lost {TRIES} races in a row")

    async def _born(self) -> None:
        """Mark the group new (once: the txn loses to a concurrent first member)."""
        lease = await self._grant_lease(self.cfg.ttl)
        born = _b64(f"{self.root}born")
        await self._txn([{"request_put": {"key": born, "value": _b64(str(time.time()))}},
                         {"request_put": {"key": _b64(f"{self.root}warmup"), "value": "", "lease": lease}}],
                        [{"key": born, "target": "VERSION", "result": "EQUAL", "version": "0"}])

    async def beat(self, report: Report) -> Standing:
        fresh = await self._keepalive(report.node)
        if report.status == "shed":
            if fresh or self._written is None or self._written[0] != "shed":
                return await self._check(report, recheck=False)
            await self._write(report, "shed")  # only when the reasons changed
            return Standing("shed")
        await self._write(report, report.status)
        return Standing(report.status)

    async def acquire(self, report: Report) -> Standing:
        await self._keepalive(report.node)
        return await self._check(report, recheck=True)

    async def release(self, report: Report) -> Standing:
        return await self.beat(report)

    async def members(self) -> Group:
        data = await self._txn([_range(f"{self.root}serving/", prefix=True), _range(f"{self.root}down/", prefix=True),
                                _range(f"{self.root}seen/", prefix=True)])
        live: dict[str, dict[str, Any]] = {}
        last: dict[str, dict[str, Any]] = {}
        for i, r in enumerate(data["responses"]):
            for kv in r["response_range"].get("kvs", []):
                node = _unb64(kv["key"]).rpartition("/")[2]
                try:
                    doc = json.loads(_unb64(kv.get("value", "")) or "{}")
                except ValueError:
                    doc = {}
                (last if i == 2 else live)[node] = doc
        members = []
        for node in sorted(set(live) | set(last)):
            doc = live.get(node) or last.get(node) or {}
            reasons, since = parse_doc(json.dumps(doc))
            status: MemberStatus = doc["status"] if doc.get("status") in ("up", "held", "down", "shed") else "up"
            members.append(Member(node, status, node in live, reasons, since, None))
        expected = expected_size(self.cfg.size, len(members))
        serving_n = sum(1 for m in members if m.alive and m.status in SERVING)
        return Group(tuple(members), expected, serving_n, allowed_down(self.cfg.rule, expected))

    async def clear(self) -> None:
        """Forget the group (tests and the bench)."""
        await self._post("/v3/kv/deleterange", {"key": _b64(self.root), "range_end": _b64(_prefix_end(self.root))})

    async def close(self) -> None:
        if self._own_session and self._session is not None:
            await self._session.close()
        self._session = None

    def __repr__(self) -> str:
        return f"EtcdStore({self.base}, group={self.cfg.group!r})"

"""The Redis store: one Lua script per call, timed by the server's TIME, so every decision is atomic."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from agent.fleet.store import Group, Member, Report, Standing, parse_doc

if TYPE_CHECKING:
    import redis.asyncio

    from agent.fleet.config import FleetConfig

# Keys of a group share one hash tag, so the script runs on Redis Cluster too. Every member is in `seen`
# (score: its last beat, server milliseconds) and in exactly one of `serving` and `down` (same score);
# `shed` holds the members of `down` that have a grant (score: when granted). A member whose score is
# older than ttl is silent: it counts toward the expected size (for `window`) but never as serving.
# `born` is when the store first saw the group: for one ttl after that (a new group, or a store that
# restarted empty) nothing is granted, since live members not yet back would be missing from the counts.
# TIME inside a script that writes is allowed since Redis 5 (effects replication; the only mode in 7.0).
SCRIPT = """
local seen, serving, down, shed, status, info, born = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7]
local op, node, want, doc = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local ttl, window = tonumber(ARGV[5]), tonumber(ARGV[6])
local count, bps, size = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local alive = now - ttl
for _, m in ipairs(redis.call('ZRANGEBYSCORE', seen, '-inf', '(' .. (now - window), 'LIMIT', 0, 16)) do
  redis.call('ZREM', seen, m); redis.call('ZREM', serving, m); redis.call('ZREM', down, m)
  redis.call('ZREM', shed, m); redis.call('HDEL', status, m); redis.call('HDEL', info, m)
end
redis.call('ZADD', seen, now, node)
local since = tonumber(redis.call('GET', born) or now)
if since == now then redis.call('SET', born, now) end
local warm = now - since < ttl
local function live(key)
  local s = redis.call('ZSCORE', key, node)
  return s and tonumber(s) >= alive
end
local holds = redis.call('ZSCORE', shed, node) and live(down)
local expected = math.max(size, redis.call('ZCOUNT', seen, now - window, '+inf'))
local allowed
if count >= 0 then allowed = math.min(count, expected) else allowed = math.floor(expected * bps / 10000) end
local others = redis.call('ZCOUNT', serving, alive, '+inf')
if live(serving) then others = others - 1 end
local result = want
if want == 'shed' and (op == 'acquire' or not holds) and (warm or others < expected - allowed) then
  result = 'held'
end
if result == 'shed' or result == 'down' then
  redis.call('ZREM', serving, node)
  redis.call('ZADD', down, now, node)
  if result == 'down' then redis.call('ZREM', shed, node)
  elseif not holds then redis.call('ZADD', shed, now, node) end
else
  redis.call('ZREM', down, node)
  redis.call('ZREM', shed, node)
  redis.call('ZADD', serving, now, node)
end
redis.call('HSET', status, node, result)
redis.call('HSET', info, node, doc)
for _, k in ipairs(KEYS) do redis.call('PEXPIRE', k, 2 * window) end
if result == 'up' or result == 'held' then others = others + 1 end
return {result, expected, others, allowed, now}
"""

NAMES = ("seen", "serving", "down", "shed", "status", "info", "born")


def client_for(cfg: FleetConfig) -> redis.asyncio.Redis:
    """A client with no retries of its own (the guard retries on its heartbeat) and the guard's timeout."""
    import redis.asyncio
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    from agent.probes.redis import no_setinfo

    return redis.asyncio.from_url(
        cfg.store, socket_timeout=cfg.timeout, socket_connect_timeout=cfg.timeout, retry=Retry(NoBackoff(), 0),
        decode_responses=True, protocol=2, max_connections=4, health_check_interval=0, **no_setinfo(),
    )


class RedisStore:
    """Store on Redis 5+ (redis-py's asyncio client); `client` may be shared by many stores (the bench)."""

    def __init__(self, cfg: FleetConfig, client: redis.asyncio.Redis | None = None):
        self.cfg = cfg
        self.client = client if client is not None else client_for(cfg)
        self._own_client = client is None
        tag = "{" + cfg.group + "}"
        self.keys = [f"healthgate:fleet:{tag}:{name}" for name in NAMES]
        self._script = self.client.register_script(SCRIPT)
        rule = cfg.rule
        self._rule_args = [rule.count if rule.count is not None else -1, rule.bps or 0, cfg.size or 0]
        self.calls = 0  # requests sent to the store (the bench's ops per member)

    async def _call(self, op: str, report: Report) -> Standing:
        args: list[str | int] = [op, report.node, report.status, report.doc(), math.ceil(self.cfg.ttl * 1000),
                math.ceil(self.cfg.window * 1000), *self._rule_args]
        self.calls += 1
        status, expected, serving, allowed, _now = await self._script(keys=self.keys, args=args)
        return Standing(status, int(expected), int(serving), int(allowed))

    async def beat(self, report: Report) -> Standing:
        return await self._call("beat", report)

    async def acquire(self, report: Report) -> Standing:
        return await self._call("acquire", report)

    async def release(self, report: Report) -> Standing:
        return await self._call("beat", report)

    async def members(self) -> Group:
        from agent.fleet.budget import allowed_down, expected_size

        seen, _serving, _down, _shed, status, info, _born = self.keys
        pipe = self.client.pipeline(transaction=True)
        # queued one by one: redis-py types a command's reply, not the pipeline it returns for chaining
        pipe.time()
        pipe.zrange(seen, 0, -1, withscores=True)
        pipe.hgetall(status)
        pipe.hgetall(info)
        now_pair, beats, statuses, infos = await pipe.execute()
        now = now_pair[0] * 1000 + now_pair[1] // 1000
        members: list[Member] = []
        for node, score in beats:
            silent = max(0.0, (now - score) / 1000)
            if silent > self.cfg.window:
                continue
            reasons, since = parse_doc(infos.get(node))
            members.append(Member(node, statuses.get(node, "up"), silent <= self.cfg.ttl, reasons, since, silent))
        members.sort(key=lambda m: m.node)
        expected = expected_size(self.cfg.size, len(members))
        serving_n = sum(1 for m in members if m.alive and m.status in ("up", "held"))
        return Group(tuple(members), expected, serving_n, allowed_down(self.cfg.rule, expected))

    async def clear(self) -> None:
        """Forget the group (tests and the bench)."""
        await self.client.delete(*self.keys)

    async def close(self) -> None:
        if self._own_client:
            await self.client.aclose()

    def __repr__(self) -> str:
        return f"RedisStore({self.cfg.store_display}, group={self.cfg.group!r})"

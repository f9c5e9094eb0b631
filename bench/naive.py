"""The naive health endpoint many services ship: an aiohttp /health that pings Redis and PostgreSQL inline.

It is the comparison point, not an example: every probe becomes two dependency round trips, so probe
traffic is multiplied onto the dependencies and its latency is theirs.
"""

from __future__ import annotations

import argparse
import asyncio

import asyncpg
import redis.asyncio as aioredis
from aiohttp import web

REDIS = web.AppKey("redis", aioredis.Redis)
PG = web.AppKey("pg", asyncpg.Pool)


async def health(request: web.Request) -> web.Response:
    try:
        await request.app[REDIS].ping()
        async with request.app[PG].acquire() as conn:
            await conn.fetchval("SELECT 1")
    except Exception as e:  # any failure of either dependency is a 503, as such endpoints do
        return web.Response(status=503, text=f"down: {e}\n")
    return web.Response(text="up\n", headers={"Cache-Control": "no-store"})


def make_app(redis_port: int, pg_port: int) -> web.Application:
    app = web.Application()

    async def clients(app: web.Application):
        app[REDIS] = aioredis.Redis(host="127.0.0.1", port=redis_port, socket_timeout=2)
        app[PG] = await asyncpg.create_pool(host="127.0.0.1", port=pg_port, user="postgres", database="postgres",
                                            min_size=1, max_size=10)
        yield
        await app[PG].close()
        await app[REDIS].aclose()

    app.cleanup_ctx.append(clients)
    app.router.add_get("/health", health)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis-port", type=int, required=True)
    parser.add_argument("--pg-port", type=int, required=True)
    parser.add_argument("--loop", choices=("auto", "asyncio", "uvloop"), default="auto")
    args = parser.parse_args()
    if args.loop != "asyncio":
        try:
            import uvloop

            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        except ImportError:
            if args.loop == "uvloop":
                raise
    web.run_app(make_app(args.redis_port, args.pg_port), host="127.0.0.1", port=args.port, access_log=None,
                print=None)


if __name__ == "__main__":
    main()

"""The idle reference: a bare asyncio process that wakes every 100 ms, as the agent's heartbeat does."""

from __future__ import annotations

import asyncio
import sys


async def main(period: float) -> None:
    while True:  # noqa: ASYNC110 - the wake-up every period is the point
        await asyncio.sleep(period)


if __name__ == "__main__":
    asyncio.run(main(float(sys.argv[1]) if len(sys.argv) > 1 else 0.1))

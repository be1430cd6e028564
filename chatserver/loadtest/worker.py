"""A shard process: `python -m chatserver.loadtest.worker`, spawned by the coordinator.

Its first stdin line is {"plan": ..., "shard": n}; then commands, one JSON object a line.
Events go to stdout the same way. End of stdin means the coordinator is gone: abort.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from .plan import Plan
from .shard import Event
from .storm_shard import new_shard

MAX_LINE = 1 << 24


def emit(event: Event) -> None:
    sys.stdout.write(json.dumps(event, separators=(",", ":")) + "\n")
    sys.stdout.flush()


async def serve() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=MAX_LINE)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    first = await reader.readline()
    if not first:
        return
    start: dict[str, Any] = json.loads(first)
    commands: asyncio.Queue[Event] = asyncio.Queue()
    shard = new_shard(Plan.from_json(start["plan"]), int(start["shard"]), emit)

    async def pump() -> None:
        while line := await reader.readline():
            commands.put_nowait(json.loads(line))
        shard.abort()

    pumping = asyncio.create_task(pump())
    try:
        await shard.run(commands)
    finally:
        pumping.cancel()


def main() -> None:
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        runner.run(serve())


def loop_factory() -> Any:
    """uvloop's loop when it is installed, else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


if __name__ == "__main__":
    main()

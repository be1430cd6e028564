"""The outbox: script calls (publishes, presence changes, members reads) sent to Redis
in the order they were made, as pipelines of up to PUBLISH_BATCH, one batch in flight."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any, TypeVar

from ..base import BrokerUnavailable
from .client import REDIS_FAILURES, stop
from .scripts import Call, Scripts

PUBLISH_BATCH = 256  # calls per pipeline round trip
MAX_OUTBOX = 100_000  # calls waiting for Redis before new ones fail `unavailable`
DRAIN_TIMEOUT = 2.0  # seconds close() waits for what is queued

T = TypeVar("T")
_Entry = tuple[Call, "asyncio.Future[Any] | None", Callable[[Any], Any]]


def _raw(reply: Any) -> Any:
    return reply


class Outbox:
    """One round trip per batch instead of per message is what lets one publisher's
    messages reach the fan-out together; one batch in flight keeps them in order."""

    def __init__(self, scripts: Scripts) -> None:
        self._scripts = scripts
        self._queue: list[_Entry] = []
        self._sender: asyncio.Task[None] | None = None

    def put(self, call: Call, future: asyncio.Future[T] | None = None,
            convert: Callable[[Any], T] = _raw) -> None:
        """Queue a call; `future` gets convert(reply), or BrokerUnavailable. A full outbox
        fails the future at once (and drops a call without one)."""
        if len(self._queue) >= MAX_OUTBOX:
            if future is not None:
                future.set_exception(BrokerUnavailable("too many calls waiting for redis"))
            return
        self._queue.append((call, future, convert))
        if self._sender is None or self._sender.done():
            self._sender = asyncio.create_task(self._send(), name="redis-outbox")

    async def close(self) -> None:
        """Give what is queued DRAIN_TIMEOUT to reach Redis, then stop."""
        sender = self._sender
        if sender is None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(sender), DRAIN_TIMEOUT)
        await stop(sender)

    async def _send(self) -> None:
        await asyncio.sleep(0)  # let this loop pass add to the batch
        while self._queue:
            batch, self._queue = self._queue[:PUBLISH_BATCH], self._queue[PUBLISH_BATCH:]
            try:
                results = await self._scripts.run([call for call, _, _ in batch])
            except REDIS_FAILURES as exc:
                failure = BrokerUnavailable(f"redis call failed: {type(exc).__name__}")
                results = [failure] * len(batch)
            for (_, future, convert), result in zip(batch, results, strict=True):
                if future is None or future.done():
                    continue
                if isinstance(result, Exception):
                    future.set_exception(BrokerUnavailable(f"redis call failed: {result}"))
                else:
                    future.set_result(convert(result))

"""How the coordinator talks to a shard: in its own event loop, or in a worker process.

Both put `(shard number, event)` on the coordinator's queue and take commands by send();
stop() ends the shard within a bound, killing a worker process by its PID if need be.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from typing import Protocol

from .plan import Plan
from .shard import Event
from .storm_shard import new_shard
from .worker import MAX_LINE

Events = asyncio.Queue[tuple[int, Event]]
STOP_TIMEOUT = 15.0  # a shard closes its sockets within 10 s; then it is killed


class Link(Protocol):
    number: int

    def send(self, command: Event) -> None: ...

    async def stop(self) -> None: ...


class LocalLink:
    """A shard running as a task in the coordinator's loop (--procs 1)."""

    def __init__(self, plan: Plan, number: int, events: Events) -> None:
        self.number = number
        self.commands: asyncio.Queue[Event] = asyncio.Queue()
        self.shard = new_shard(plan, number, lambda event: events.put_nowait((number, event)))
        self.task = asyncio.create_task(self.shard.run(self.commands))

    def send(self, command: Event) -> None:
        self.commands.put_nowait(command)

    async def stop(self) -> None:
        self.shard.abort()  # after `finish` there is nothing left to cut short but the closing
        try:
            async with asyncio.timeout(STOP_TIMEOUT):
                await asyncio.shield(self.task)
        except TimeoutError:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task


class ProcessLink:
    """A shard in a worker process, JSON lines over its stdin and stdout."""

    def __init__(self, number: int, proc: asyncio.subprocess.Process, events: Events) -> None:
        self.number = number
        self.proc = proc
        self.reader = asyncio.create_task(self._read(events))

    @classmethod
    async def start(cls, plan: Plan, number: int, events: Events) -> ProcessLink:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "chatserver.loadtest.worker",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, limit=MAX_LINE,
            start_new_session=True,  # Ctrl-C reaches the coordinator only; it stops the rest
        )
        link = cls(number, proc, events)
        link.send({"plan": plan.to_json(), "shard": number})
        return link

    def send(self, command: Event) -> None:
        stdin = self.proc.stdin
        if stdin is not None and not stdin.is_closing():
            stdin.write(json.dumps(command, separators=(",", ":")).encode() + b"\n")

    async def _read(self, events: Events) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            try:
                events.put_nowait((self.number, json.loads(line)))
            except ValueError:
                sys.stderr.write(line.decode(errors="replace"))  # not ours: pass it on
        code = await self.proc.wait()
        events.put_nowait((self.number, {"event": "exit", "code": code}))

    async def stop(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()  # end of input: the worker aborts and closes its sockets
        try:
            async with asyncio.timeout(STOP_TIMEOUT):
                await self.proc.wait()
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
        self.reader.cancel()

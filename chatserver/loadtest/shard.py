"""A shard: one process's share of the clients, run phase by phase on the coordinator's
commands (connect, publish or chat, drain, finish), reporting events back.

The same class runs in the coordinator's process (--procs 1) or in a worker process
(worker.py); events are plain dicts either way.
"""

from __future__ import annotations

import asyncio
import math
import random
import resource
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import aiohttp

from .auth import Tokens
from .client import Client, ConnectFailed
from .plan import Plan, RunError, Target
from .stats import Tally

Event = dict[str, Any]
Emit = Callable[[Event], None]
PROGRESS_EVERY = 0.25  # seconds between progress events
FD_MARGIN = 64  # descriptors beyond one per client: pipes, DNS, the event loop


class SignsIn(Protocol):
    """A simulated user as the sign-in sees it: a name and URL in, a token out."""

    username: str
    token: str

    @property
    def target(self) -> Target: ...


class ShardAborted(Exception):
    """The coordinator went away or said abort."""


class Shard:
    def __init__(self, plan: Plan, number: int, emit: Emit) -> None:
        self.plan = plan
        self.number = number
        self.emit = emit
        self.tally = Tally()
        self.signed_in = 0
        self.clients = self._lobby_clients()
        self.publisher: Client | None = None
        if plan.scenario == "fanout" and number == 0:
            index = plan.publisher
            # Its own tally while connecting: it is not one of the counted subscribers.
            self.publisher = Client(index, plan.username(index), plan.target(index),
                                    plan.run_id, Tally(), counted=False)
        self.live: list[Client] = []
        self.work: asyncio.Task[None] | None = None
        self.concurrency = max(1, math.ceil(plan.concurrency / plan.procs))

    def _lobby_clients(self) -> list[Client]:
        plan = self.plan
        return [Client(i, plan.username(i), plan.target(i), plan.run_id, self.tally)
                for i in plan.shard_indices(self.number)]

    async def run(self, commands: asyncio.Queue[Event]) -> None:
        """Every phase, until `finish` or abort(); a failure becomes a `fatal` event."""
        connector = aiohttp.TCPConnector(limit=0)  # sockets stay open: no pool limit
        session = aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar())
        progress = asyncio.create_task(self._progress())
        self.work = asyncio.create_task(self._phases(session, commands))
        try:
            await self.work
        except RunError as exc:
            self.emit({"event": "fatal", "error": str(exc)})
        except ShardAborted:
            pass
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # we are cancelled ourselves, not aborted
        except Exception as exc:  # a bug: say so rather than leave the coordinator waiting
            traceback.print_exc()
            self.emit({"event": "fatal", "error": f"shard {self.number} crashed: {exc!r}"})
        finally:
            self.work.cancel()
            progress.cancel()
            await self._close_all()
            await session.close()

    def abort(self) -> None:
        """Stop whatever phase is running; run() then closes every socket and returns."""
        if self.work is not None:
            self.work.cancel()

    async def _phases(self, session: aiohttp.ClientSession,
                      commands: asyncio.Queue[Event]) -> None:
        ensure_descriptors(len(self.clients) + FD_MARGIN)
        await self._sign_in(session, self._everyone())
        self.emit({"event": "signed_in"})
        await self._expect(commands, "connect")
        started = time.monotonic_ns()
        await self._connect(session)
        self.emit({"event": "connected", "started_ns": started, "done_ns": time.monotonic_ns()})
        while True:
            command = await self._expect(commands, "publish", "chat", "drain", "finish")
            if command["cmd"] == "finish":
                return
            await self._phase(command)

    async def _phase(self, command: Event) -> None:
        if command["cmd"] == "publish":
            await self._publish()
        elif command["cmd"] == "chat":
            await self._chat(int(command["start_ns"]))
        else:
            await self._drain(int(command["expected"]))
            self.emit({"event": "result", "tally": self.tally.to_json()})

    async def _expect(self, commands: asyncio.Queue[Event], *names: str) -> Event:
        command = await commands.get()
        if command.get("cmd") not in names:
            raise ShardAborted(str(command.get("cmd")))
        return command

    async def _progress(self) -> None:
        while True:
            await asyncio.sleep(PROGRESS_EVERY)
            self.emit(self._progress_event())

    def _progress_event(self) -> Event:
        tally = self.tally
        return {"event": "progress", "signed_in": self.signed_in, "connected": tally.connected,
                "failed": sum(tally.connect_failures.values()), "sent": tally.sent,
                "delivered": tally.deliveries}

    # ------------------------------------------------------ sign-in, connect

    async def _sign_in(self, session: aiohttp.ClientSession, everyone: Sequence[SignsIn]) -> None:
        tokens = Tokens(self.plan)
        if tokens.issuer is not None:
            for n, client in enumerate(everyone, 1):
                client.token = tokens.mint(client.username)
                self.signed_in = n
                if n % 50 == 0:
                    await asyncio.sleep(0)  # RSA signing is CPU work: let progress out
            return
        gate = asyncio.Semaphore(self.concurrency)
        timeout = self.plan.connect_timeout

        async def one(client: SignsIn) -> None:
            async with gate:
                client.token = await tokens.login(session, client.target, client.username,
                                                  timeout)
                self.signed_in += 1

        tasks = [asyncio.create_task(one(client)) for client in everyone]
        try:
            await asyncio.gather(*tasks)  # the first refusal stops every other sign-in
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _connect(self, session: aiohttp.ClientSession) -> None:
        timeout = self.plan.connect_timeout
        if self.publisher is not None:
            try:
                await self.publisher.connect(session, timeout)
            except ConnectFailed as exc:
                raise RunError(f"the fanout publisher could not connect: {exc}") from None
            self.publisher.tally = self.tally  # from now on its sends count
        gate = asyncio.Semaphore(self.concurrency)

        async def one(client: Client) -> None:
            async with gate:
                self.tally.attempted += 1
                try:
                    await client.connect(session, timeout)
                except ConnectFailed as exc:
                    self.tally.connect_failures[str(exc)] += 1
                    await client.close()
                    return
                self.tally.connected += 1
                self.live.append(client)

        await asyncio.gather(*(one(client) for client in self.clients))

    def _everyone(self) -> list[Client]:
        return [*self.clients, *([self.publisher] if self.publisher else [])]

    async def _close_all(self) -> None:
        everyone = self._everyone()
        if everyone:
            await asyncio.wait([asyncio.create_task(c.close()) for c in everyone], timeout=10)

    # ----------------------------------------------------------- scenarios

    async def _publish(self) -> None:
        """fanout: M messages, at most K in flight (sent, not yet echoed to the publisher)."""
        plan, publisher = self.plan, self.publisher
        assert publisher is not None
        publisher.window = asyncio.Semaphore(plan.inflight)
        interval = 1 / plan.publish_rate if plan.publish_rate else 0.0
        start = time.monotonic()
        for seq in range(plan.messages):
            if interval:
                await _sleep_until(start + seq * interval)
            await publisher.send(plan.run_id, seq, plan.size)
            if publisher.closed_by_server is not None:
                break
        await _wait(publisher.drained, plan.grace)
        self._sent()

    async def _chat(self, start_ns: int) -> None:
        """chat: every live client sends `rate` messages a second, phases spread at random."""
        plan = self.plan
        interval = 1 / plan.rate
        count = plan.per_client_messages()
        # start_ns is on the shared monotonic clock, so every shard starts together.
        start = time.monotonic() + (start_ns - time.monotonic_ns()) / 1e9

        async def one(client: Client, phase: float) -> None:
            for seq in range(count):
                await _sleep_until(start + phase + seq * interval)
                await client.send(plan.run_id, seq, plan.size)
                if client.closed_by_server is not None:
                    return

        await asyncio.gather(*(one(c, random.uniform(0, interval)) for c in self.live))
        await _wait_all([c.drained for c in self.live], plan.grace)
        self._sent()

    def _sent(self) -> None:
        tally = self.tally
        self.emit({"event": "sent", "sent": tally.sent, "refused": tally.refused,
                   "unconfirmed": tally.unconfirmed})

    async def _drain(self, expected: int) -> None:
        """Until each live client has `expected` distinct messages, or the grace is over."""
        deadline = time.monotonic() + self.plan.grace
        while time.monotonic() < deadline:
            if all(c.distinct >= expected or c.closed_by_server is not None for c in self.live):
                return
            await asyncio.sleep(0.02)


async def _sleep_until(when: float) -> None:
    delay = when - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)


async def _wait(event: asyncio.Event, timeout: float) -> None:
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        pass


async def _wait_all(events: list[asyncio.Event], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for event in events:
        await _wait(event, max(0.0, deadline - time.monotonic()))


def ensure_descriptors(needed: int) -> None:
    """Raise the soft open-files limit toward the hard one; fail clearly if still short."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    if soft != resource.RLIM_INFINITY and soft < needed:
        raise RunError(f"this process needs {needed} open files but `ulimit -n` allows "
                       f"{soft}: raise it, or spread clients with more --procs")

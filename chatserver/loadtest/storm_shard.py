"""A shard's side of the storm: its members connect, one per room publishes, and each
member that loses its socket reconnects and resumes by itself, as a browser would.

Commands, in order: connect, storm (start publishing), kill (the storm began: time the
survivors), calm (every dropped member resumed), stop (stop publishing; report what each
room stored), drain (wait for every stored message; report), finish.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time

import aiohttp

from .client import Client, ConnectFailed
from .member import Member, backoff
from .plan import Plan
from .shard import FD_MARGIN, Emit, Event, Shard, ensure_descriptors
from .storm_book import Book

POLL = 0.02  # seconds between checks while waiting for the last deliveries
LAG_TICK_NS = 20_000_000  # between samples of this process's own loop lag


def new_shard(plan: Plan, number: int, emit: Emit) -> Shard:
    """The shard a scenario runs on, in this process or a worker process."""
    return (StormShard if plan.scenario == "storm" else Shard)(plan, number, emit)


class StormShard(Shard):
    def __init__(self, plan: Plan, number: int, emit: Emit) -> None:
        super().__init__(plan, number, emit)
        self.book = Book()
        self.members = [
            Member(i, plan.username(i), plan.targets, plan.room_of(i), i % plan.rooms,
                   plan.run_id, self.tally, self.book)
            for i in plan.shard_indices(number)
        ]
        self.publishers = [m for m in self.members if m.index == m.publisher]
        self.keepers: list[asyncio.Task[None]] = []
        self.publishing: asyncio.Task[None] | None = None
        self.sampling: asyncio.Task[None] | None = None

    def _lobby_clients(self) -> list[Client]:
        return []  # storm clients are Members

    def _progress_event(self) -> Event:
        event = super()._progress_event()
        event.update(dropped=sum(self.book.drops.values()),
                     pending=sum(1 for m in self.members if m.pending))
        return event

    async def _phases(self, session: aiohttp.ClientSession,
                      commands: asyncio.Queue[Event]) -> None:
        ensure_descriptors(len(self.members) + FD_MARGIN)
        await self._sign_in(session, self.members)
        self.emit({"event": "signed_in"})
        await self._expect(commands, "connect")
        started = time.monotonic_ns()
        await self._connect_members(session)
        self.emit({"event": "connected", "started_ns": started, "done_ns": time.monotonic_ns()})
        command = await self._expect(commands, "storm")
        self.publishing = asyncio.create_task(self._publish_rooms(int(command["start_ns"])))
        self.sampling = asyncio.create_task(self._sample_lag())
        while True:
            command = await self._expect(commands, "kill", "calm", "stop", "drain", "finish")
            name = command["cmd"]
            if name == "finish":
                return
            if name in ("kill", "calm"):
                self.book.storming = name == "kill"
            elif name == "stop":
                await self._stop_publishing()
            else:
                stored = command["stored"]
                await self._drain_rooms({room: set(seqs) for room, seqs in stored.items()})

    async def _connect_members(self, session: aiohttp.ClientSession) -> None:
        timeout = self.plan.connect_timeout
        gate = asyncio.Semaphore(self.concurrency)

        async def one(member: Member) -> None:
            async with gate:
                self.tally.attempted += 1
                for attempt in itertools.count():
                    try:
                        await member.connect(session, timeout)
                        break
                    except ConnectFailed as exc:
                        if not exc.retry_after:
                            self.tally.connect_failures[str(exc)] += 1
                            return
                        # Shed (503 + Retry-After): a client comes back, as told.
                        self.book.connect_shed += 1
                        await asyncio.sleep(backoff(attempt, None, exc.retry_after))
                self.tally.connected += 1
                self.keepers.append(asyncio.create_task(member.keep(session, timeout)))

        await asyncio.gather(*(one(member) for member in self.members))

    async def _publish_rooms(self, start_ns: int) -> None:
        """Each publisher sends --rate messages a second to its room, phases at random."""
        plan = self.plan
        interval = 1 / plan.rate
        start = time.monotonic() + (start_ns - time.monotonic_ns()) / 1e9

        async def one(member: Member, phase: float) -> None:
            tick = 0
            while True:
                delay = start + phase + tick * interval - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                await member.publish(plan.run_id, plan.size)
                tick += 1

        await asyncio.gather(*(one(m, random.uniform(0, interval)) for m in self.publishers))

    async def _sample_lag(self) -> None:
        """This process's own lateness in the storm: every latency it measures includes
        it, so a saturated load generator shows here rather than as the server's delay."""
        while True:
            due = time.monotonic_ns() + LAG_TICK_NS
            await asyncio.sleep(LAG_TICK_NS / 1e9)
            if self.book.storming:
                self.book.client_lag.record_ns(time.monotonic_ns() - due)

    async def _stop_publishing(self) -> None:
        if self.publishing is not None:
            self.publishing.cancel()
        deadline = time.monotonic() + self.plan.grace
        while time.monotonic() < deadline:
            if not any(m.outstanding for m in self.publishers):
                break
            await asyncio.sleep(POLL)
        tally = self.tally
        tally.unconfirmed = sum(len(m.outstanding) for m in self.publishers)
        # What each room stored: acknowledged, or seen back (a replay shows what was kept of
        # the publishes in flight when the publisher's socket dropped).
        stored = {m.room: sorted(m.acked) for m in self.publishers}
        self.emit({"event": "sent", "sent": tally.sent, "refused": tally.refused,
                   "unconfirmed": tally.unconfirmed, "stored": stored})

    async def _drain_rooms(self, stored: dict[str, set[int]]) -> None:
        """Until every member holds every message its room stored, or the grace is over."""
        deadline = time.monotonic() + self.plan.grace
        while time.monotonic() < deadline:
            if all(not m.missing(stored.get(m.room, set())) for m in self.members if m.online):
                break
            await asyncio.sleep(POLL)
        connected = [m for m in self.members if m.online or m.dropped]  # not those never in
        self.emit({"event": "result", "tally": self.tally.to_json(),
                   "book": self.book.to_json(),
                   "expected": sum(len(stored.get(m.room, ())) for m in connected),
                   "lost": sum(m.missing(stored.get(m.room, set())) for m in connected),
                   "unresumed": sum(1 for m in self.members if m.pending)})

    async def _close_all(self) -> None:
        for task in (self.publishing, self.sampling):
            if task is not None:
                task.cancel()
        for keeper in self.keepers:
            keeper.cancel()
        if self.members:
            await asyncio.wait([asyncio.create_task(m.stop()) for m in self.members], timeout=10)

"""The coordinator's side of a run: it walks the shards through the phases, with barriers
between, and merges their tallies into an Outcome.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from .links import Events, Link
from .plan import Plan, RunError
from .progress import Progress
from .shard import Event
from .stats import Tally

START_DELAY = 0.2  # seconds between the chat command and its common start, so all start at once


@dataclass
class Outcome:
    """The merged tally, plus what only the coordinator knows."""

    tally: Tally
    connect_seconds: float
    accepted: int  # messages the server surely took (see confirmed); each is due everywhere
    seconds: float
    storm: dict[str, Any] | None = None  # storm: what only that scenario measures


def confirmed(sent: Event) -> int:
    """Messages the server surely took: sent, minus refused, minus those in doubt."""
    return int(sent["sent"]) - int(sent["refused"]) - int(sent["unconfirmed"])


class Conductor:
    def __init__(self, plan: Plan, links: list[Link], events: Events,
                 progress: Progress) -> None:
        self.plan = plan
        self.links = links
        self.events = events
        self.progress = progress
        self.phase = "starting the shards"

    async def run(self) -> Outcome:
        plan = self.plan
        started = time.monotonic()
        self.progress.clients = plan.clients
        if plan.scenario == "fanout":
            self.progress.expected = plan.clients * plan.messages
        elif plan.scenario == "chat":
            self.progress.expected = plan.clients ** 2 * plan.per_client_messages()
        connect_ns = await self.open()
        accepted = 0
        if plan.scenario == "connect":
            if plan.hold:
                self._enter("holding")
                await asyncio.sleep(plan.hold)
        elif plan.scenario == "fanout":
            self._enter("publishing")
            self.links[0].send({"cmd": "publish"})
            sent = await self.collect("sent", only=0)
            accepted = confirmed(sent[0])
        else:
            self._enter("chatting")
            start_ns = time.monotonic_ns() + int(START_DELAY * 1e9)
            self.broadcast({"cmd": "chat", "start_ns": start_ns})
            sent = await self.collect("sent")
            accepted = sum(confirmed(e) for e in sent.values())
        self._enter("draining")
        self.broadcast({"cmd": "drain", "expected": accepted})
        results = await self.collect("result")
        self.broadcast({"cmd": "finish"})
        tally = Tally()
        for event in results.values():
            tally.merge(Tally.from_json(event["tally"]))
        return Outcome(tally, connect_ns / 1e9, accepted, time.monotonic() - started)

    async def open(self) -> int:
        """Every shard signs in, then connects; returns the nanoseconds connecting took."""
        self._enter("signing in")
        await self.collect("signed_in")
        self._enter("connecting")
        self.broadcast({"cmd": "connect"})
        connected = await self.collect("connected")
        return (max(int(e["done_ns"]) for e in connected.values())
                - min(int(e["started_ns"]) for e in connected.values()))

    def _enter(self, phase: str) -> None:
        self.phase = phase
        self.progress.set_phase(phase)

    def broadcast(self, command: Event) -> None:
        for link in self.links:
            link.send(command)

    async def collect(self, kind: str, *, only: int | None = None) -> dict[int, Event]:
        """Wait for event `kind` from every shard (or one); a shard's failure ends the run."""
        wanted = {only} if only is not None else {link.number for link in self.links}
        got: dict[int, Event] = {}
        while wanted - got.keys():
            number, event = await self.events.get()
            if self.note(number, event) == kind and number in wanted:
                got[number] = event
        return got

    def note(self, number: int, event: Event) -> str:
        """Show progress, end the run on a shard's failure; returns the event's name."""
        name = str(event.get("event"))
        if name == "progress":
            self.progress.update(number, event)
        elif name == "fatal":
            raise RunError(str(event["error"]))
        elif name == "exit":
            raise RunError(f"shard {number} exited with status {event['code']} while "
                           f"{self.phase} (its error is above)")
        return name

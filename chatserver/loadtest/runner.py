"""The coordinator: checks the servers, starts the shards, walks them through the phases
with barriers between, and merges their tallies. The whole run is under one deadline.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import aiohttp

from .auth import Tokens, check_token
from .client import os_reason
from .links import Events, Link, LocalLink, ProcessLink
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


async def run(plan: Plan, progress: Progress) -> Outcome:
    """Run the plan; raise RunError with a one-line reason when it cannot finish."""
    await preflight(plan)
    events: Events = asyncio.Queue()
    links: list[Link] = []
    conductor = Conductor(plan, links, events, progress)
    try:
        async with asyncio.timeout(plan.deadline):
            if plan.procs == 1:
                links.append(LocalLink(plan, 0, events))
            else:
                for number in range(plan.procs):
                    links.append(await ProcessLink.start(plan, number, events))
            return await conductor.run()
    except TimeoutError:
        raise RunError(f"deadline of {plan.deadline:g} s passed while {conductor.phase} "
                       "(raise --deadline, or lower the load)") from None
    finally:
        progress.clear()
        await asyncio.gather(*(link.stop() for link in links))


async def preflight(plan: Plan) -> None:
    """One request per URL, so a wrong URL or key fails at once with a clear reason."""
    timeout = plan.connect_timeout
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
        for target in plan.targets:
            url = target.base + "/healthz"
            try:
                async with asyncio.timeout(timeout), session.get(url) as response:
                    await response.read()  # any answer will do: a proxy may not route /healthz
            except TimeoutError:
                raise RunError(
                    f"cannot reach {target.base}: no answer within {timeout:g} s") from None
            except aiohttp.ClientConnectorError as exc:
                raise RunError(f"cannot reach {target.base}: {os_reason(exc.os_error)}") from None
            except (aiohttp.ClientError, OSError) as exc:
                raise RunError(f"cannot reach {target.base}: {exc}") from None
        if plan.private_key_pem is not None:
            token = Tokens(plan).mint(plan.username(-1))
            for target in plan.targets:
                await check_token(session, target, token)


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
        self._enter("signing in")
        await self.collect("signed_in")
        self._enter("connecting")
        self.broadcast({"cmd": "connect"})
        connected = await self.collect("connected")
        connect_ns = (max(int(e["done_ns"]) for e in connected.values())
                      - min(int(e["started_ns"]) for e in connected.values()))
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
            name = event.get("event")
            if name == "progress":
                self.progress.update(number, event)
            elif name == "fatal":
                raise RunError(str(event["error"]))
            elif name == "exit":
                raise RunError(f"shard {number} exited with status {event['code']} while "
                               f"{self.phase} (its error is above)")
            elif name == kind and number in wanted:
                got[number] = event
        return got

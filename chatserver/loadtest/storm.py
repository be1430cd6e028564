"""The coordinator's side of the reconnect storm.

Every client joins one of --rooms rooms (one publisher each, --rate messages a second) on
the URLs of the list; after --warmup seconds one server is stopped (SIGTERM to --stop-pid,
or --stop-cmd), and its clients reconnect with the browser client's backoff to the other
URLs and resume. The storm is over once that server is gone and no client is still
waiting to resume; traffic goes on for --after seconds, then every room's stored messages
are checked against what each member received.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any

import aiohttp

from .conductor import START_DELAY, Conductor, Outcome
from .plan import Plan, RunError
from .shard import PROGRESS_EVERY
from .stats import Tally
from .storm_book import Book
from .storm_report import lag_buckets, lag_diff

NOTHING_DROPPED_AFTER = 3.0  # seconds after the stop with no drop: the wrong server was named


class StormConductor(Conductor):
    async def run(self) -> Outcome:
        plan = self.plan
        started = time.monotonic()
        self.progress.clients = plan.clients
        if plan.stop_pid is not None and not alive(plan.stop_pid):
            raise RunError(f"--stop-pid {plan.stop_pid}: no such process")
        connect_ns = await self.open()
        self._enter("warming up")
        self.broadcast({"cmd": "storm", "start_ns": time.monotonic_ns() + int(START_DELAY * 1e9)})
        await self.watch(START_DELAY + plan.warmup)
        lag_before = await scrape_lags(plan)
        self._enter("storm")
        kill_ns = time.monotonic_ns()
        self.broadcast({"cmd": "kill"})
        stopper = asyncio.create_task(stop_server(plan))
        try:
            stopped_ns = await self._until_resumed(stopper)
        finally:
            stopper.cancel()
        calm_ns = time.monotonic_ns()
        self.broadcast({"cmd": "calm"})
        lag_after = await scrape_lags(plan)
        self._enter("after the storm")
        await self.watch(plan.after)
        self._enter("stopping the publishers")
        self.broadcast({"cmd": "stop"})
        stored: dict[str, list[int]] = {}
        for event in (await self.collect("sent")).values():
            stored.update(event["stored"])
        self._enter("draining")
        self.broadcast({"cmd": "drain", "stored": stored})
        results = await self.collect("result")
        self.broadcast({"cmd": "finish"})
        tally, book = Tally(), Book()
        storm: dict[str, Any] = {"kill_ns": kill_ns, "stopped_ns": stopped_ns,
                                 "calm_ns": calm_ns, "expected": 0, "lost": 0, "unresumed": 0}
        for event in results.values():
            tally.merge(Tally.from_json(event["tally"]))
            book.merge(Book.from_json(event["book"]))
            for key in ("expected", "lost", "unresumed"):
                storm[key] += int(event[key])
        storm["book"] = book
        storm["server_lag"] = [lag_diff(a, b) for a, b in zip(lag_before, lag_after,
                                                               strict=True)]
        return Outcome(tally, connect_ns / 1e9, sum(len(seqs) for seqs in stored.values()),
                       time.monotonic() - started, storm=storm)

    async def watch(self, seconds: float) -> None:
        """Let `seconds` pass, showing progress and failing at once if a shard fails."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                async with asyncio.timeout(left):
                    self.note(*await self.events.get())
            except TimeoutError:
                return

    async def _until_resumed(self, stopper: asyncio.Task[None]) -> int | None:
        """Until the server is gone and every dropped client resumed (or --resume-timeout);
        returns when the server was gone (None if it never went)."""
        deadline = time.monotonic() + self.plan.resume_timeout
        heard: dict[int, float] = {}  # when each shard's latest progress arrived
        stopped_ns: int | None = None
        while (left := deadline - time.monotonic()) > 0:
            if stopped_ns is None and stopper.done():
                stopper.result()  # a stop that failed ends the run with its reason
                stopped_ns = time.monotonic_ns()
            if stopped_ns is not None and self._settled(heard, stopped_ns):
                break
            try:
                async with asyncio.timeout(min(left, PROGRESS_EVERY)):
                    number, event = await self.events.get()
            except TimeoutError:
                continue
            if self.note(number, event) == "progress":
                heard[number] = time.monotonic()
        return stopped_ns

    def _settled(self, heard: dict[int, float], stopped_ns: int) -> bool:
        """Every shard spoke since the server went, and none has a client left to resume."""
        since = stopped_ns / 1e9 + PROGRESS_EVERY
        if any(heard.get(link.number, 0.0) < since for link in self.links):
            return False
        if self.progress.total("pending"):
            return False
        return bool(self.progress.total("dropped")) or (
            time.monotonic() - stopped_ns / 1e9 > NOTHING_DROPPED_AFTER)


async def scrape_lags(plan: Plan) -> list[dict[float, int] | None]:
    """Each server's loop-lag histogram (cumulative counts by bucket bound) from its
    /metrics, or None where it does not answer (stopped, or /metrics not for us)."""
    timeout = aiohttp.ClientTimeout(total=plan.connect_timeout)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        return list(await asyncio.gather(*(_scrape(session, t.base) for t in plan.targets)))


async def _scrape(session: aiohttp.ClientSession, base: str) -> dict[float, int] | None:
    try:
        async with session.get(base + "/metrics") as response:
            if response.status != 200:
                return None
            return lag_buckets(await response.text())
    except (aiohttp.ClientError, OSError, TimeoutError):
        return None


async def stop_server(plan: Plan) -> None:
    """SIGTERM --stop-pid and wait for it to go, or run --stop-cmd to its end."""
    if plan.stop_pid is not None:
        try:
            os.kill(plan.stop_pid, signal.SIGTERM)
        except ProcessLookupError:
            raise RunError(f"--stop-pid {plan.stop_pid}: no such process") from None
        except PermissionError:
            raise RunError(f"--stop-pid {plan.stop_pid}: not ours to signal") from None
        while alive(plan.stop_pid):  # noqa: ASYNC110 - another process: nothing to await
            await asyncio.sleep(0.05)
        return
    assert plan.stop_cmd is not None
    proc = await asyncio.create_subprocess_shell(plan.stop_cmd)
    if code := await proc.wait():
        raise RunError(f"--stop-cmd exited with status {code}")


def alive(pid: int) -> bool:
    """True while the process runs (a zombie, exited but not yet reaped, is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel directly
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True

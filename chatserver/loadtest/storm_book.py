"""What a shard's storm clients saw of the storm, in a form that merges across shards
(processes) exactly, like a Tally."""

from __future__ import annotations

from collections import Counter
from typing import Any

from .stats import Histogram


class Book:
    """What a shard's members saw of the storm; it merges across shards like a Tally."""

    def __init__(self) -> None:
        # In the storm, live deliveries to never-dropped members, by the URL the message's
        # publisher first connected to: those of the URLs that dropped nobody are the
        # surviving servers' own latency.
        self.storm_latency: dict[int, Histogram] = {}
        self.dropped_from: Counter[int] = Counter()  # drops by the member's first URL
        self.drops: Counter[str] = Counter()  # sockets that ended under us, by close code
        self.attempts: Counter[str] = Counter()  # reconnect attempts, by outcome
        self.dropped_ns: list[int] = []  # when each drop happened
        self.resumed_ns: list[int] = []  # when each dropped member had its room back
        self.incomplete = 0  # resumes the server said were not complete
        self.skipped = 0  # publishes not sent because the publisher was offline
        self.presence_events = 0  # join/leave frames received in the storm
        self.client_lag = Histogram()  # how late this tool's own loop ran, in the storm
        self.connect_shed = 0  # 503s with Retry-After while first connecting (then retried)
        self.storming = False  # between the coordinator's `kill` and `calm`

    def to_json(self) -> dict[str, Any]:
        return {"storm_latency": {str(k): h.to_json() for k, h in self.storm_latency.items()},
                "dropped_from": {str(k): n for k, n in self.dropped_from.items()},
                "drops": dict(self.drops),
                "attempts": dict(self.attempts), "dropped_ns": self.dropped_ns,
                "resumed_ns": self.resumed_ns,
                "incomplete": self.incomplete, "skipped": self.skipped,
                "presence_events": self.presence_events, "connect_shed": self.connect_shed,
                "client_lag": self.client_lag.to_json()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Book:
        book = cls()
        book.storm_latency = {int(k): Histogram.from_json(h)
                              for k, h in data["storm_latency"].items()}
        book.dropped_from = Counter({int(k): int(n) for k, n in data["dropped_from"].items()})
        book.drops, book.attempts = Counter(data["drops"]), Counter(data["attempts"])
        book.dropped_ns = [int(ns) for ns in data["dropped_ns"]]
        book.resumed_ns = [int(ns) for ns in data["resumed_ns"]]
        book.incomplete, book.skipped = int(data["incomplete"]), int(data["skipped"])
        book.presence_events = int(data["presence_events"])
        book.connect_shed = int(data["connect_shed"])
        book.client_lag = Histogram.from_json(data["client_lag"])
        return book

    def merge(self, other: Book) -> None:
        for url, histogram in other.storm_latency.items():
            self.storm_latency.setdefault(url, Histogram()).merge(histogram)
        self.dropped_from.update(other.dropped_from)
        self.drops.update(other.drops)
        self.attempts.update(other.attempts)
        self.dropped_ns += other.dropped_ns
        self.resumed_ns += other.resumed_ns
        self.incomplete += other.incomplete
        self.skipped += other.skipped
        self.presence_events += other.presence_events
        self.connect_shed += other.connect_shed
        self.client_lag.merge(other.client_lag)

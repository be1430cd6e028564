"""Latency histograms and counters that merge exactly across shards (processes).

A histogram keeps integer microseconds in log-linear buckets (exact below 256 us, then
128 buckets per power of two: under 0.8 % error); merging two adds bucket counts, so the
merged histogram is the one every sample recorded in a single place would have built.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

_LINEAR = 256  # values below this many microseconds have a bucket each
_SUB_BITS = 8  # significant bits kept above that


def _bucket(us: int) -> int:
    if us < _LINEAR:
        return us
    shift = us.bit_length() - _SUB_BITS
    return (shift << _SUB_BITS) | (us >> shift)


def _upper(key: int) -> int:
    """The largest microsecond value that falls in bucket `key`."""
    if key < _LINEAR:
        return key
    shift, mantissa = key >> _SUB_BITS, key & (_LINEAR - 1)
    return ((mantissa + 1) << shift) - 1


class Histogram:
    """Latencies in microseconds; percentiles are bucket upper bounds clipped to min/max."""

    __slots__ = ("buckets", "count", "max", "min", "total")

    def __init__(self) -> None:
        self.buckets: dict[int, int] = {}
        self.count = 0
        self.total = 0
        self.min = 0
        self.max = 0

    def record_ns(self, ns: int) -> None:
        us = ns // 1000 if ns > 0 else 0  # clocks are shared (monotonic), but never negative
        key = _bucket(us)
        buckets = self.buckets
        buckets[key] = buckets.get(key, 0) + 1
        if self.count == 0 or us < self.min:
            self.min = us
        if us > self.max:
            self.max = us
        self.count += 1
        self.total += us

    def merge(self, other: Histogram) -> None:
        if other.count == 0:
            return
        for key, n in other.buckets.items():
            self.buckets[key] = self.buckets.get(key, 0) + n
        self.min = other.min if self.count == 0 else min(self.min, other.min)
        self.max = max(self.max, other.max)
        self.count += other.count
        self.total += other.total

    def percentile_us(self, q: float) -> int:
        """Nearest-rank percentile (q in 0..100)."""
        if self.count == 0:
            return 0
        rank = max(1, math.ceil(q / 100 * self.count))
        seen = 0
        for key in sorted(self.buckets):
            seen += self.buckets[key]
            if seen >= rank:
                return min(max(_upper(key), self.min), self.max)
        return self.max

    def summary_ms(self) -> dict[str, Any]:
        """count, mean, p50, p99, max in milliseconds (None when there is no sample)."""
        if self.count == 0:
            return {"count": 0, "mean": None, "p50": None, "p99": None, "max": None}
        return {
            "count": self.count,
            "mean": round(self.total / self.count / 1000, 3),
            "p50": round(self.percentile_us(50) / 1000, 3),
            "p99": round(self.percentile_us(99) / 1000, 3),
            "max": round(self.max / 1000, 3),
        }

    def to_json(self) -> dict[str, Any]:
        return {"count": self.count, "total": self.total, "min": self.min, "max": self.max,
                "buckets": [[k, n] for k, n in self.buckets.items()]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Histogram:
        hist = cls()
        hist.count, hist.total = int(data["count"]), int(data["total"])
        hist.min, hist.max = int(data["min"]), int(data["max"])
        hist.buckets = {int(k): int(n) for k, n in data["buckets"]}
        return hist


class Tally:
    """What one shard saw; every field sums (or min/max-es) into the run's totals."""

    def __init__(self) -> None:
        self.connect = Histogram()
        self.latency = Histogram()
        self.attempted = 0
        self.connected = 0
        self.connect_failures: Counter[str] = Counter()
        self.deliveries = 0  # distinct messages of this run received by counted clients
        self.duplicates = 0
        self.errors: Counter[str] = Counter()  # error frames by code
        self.closes: Counter[str] = Counter()  # sockets the server closed during the run
        self.sent = 0
        self.refused = 0  # sent, but refused by an error frame or a failed write
        self.unconfirmed = 0  # sent, neither echoed nor refused before the server closed us
        self.first_send_ns = 0
        self.last_receive_ns = 0

    def sent_one(self, now_ns: int) -> None:
        if self.sent == 0 or now_ns < self.first_send_ns:
            self.first_send_ns = now_ns
        self.sent += 1

    def to_json(self) -> dict[str, Any]:
        return {
            "connect": self.connect.to_json(), "latency": self.latency.to_json(),
            "attempted": self.attempted, "connected": self.connected,
            "connect_failures": dict(self.connect_failures), "deliveries": self.deliveries,
            "duplicates": self.duplicates, "errors": dict(self.errors),
            "closes": dict(self.closes), "sent": self.sent, "refused": self.refused,
            "unconfirmed": self.unconfirmed,
            "first_send_ns": self.first_send_ns, "last_receive_ns": self.last_receive_ns,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Tally:
        tally = cls()
        tally.connect = Histogram.from_json(data["connect"])
        tally.latency = Histogram.from_json(data["latency"])
        for name in ("attempted", "connected", "deliveries", "duplicates", "sent", "refused",
                     "unconfirmed",
                     "first_send_ns", "last_receive_ns"):
            setattr(tally, name, int(data[name]))
        tally.connect_failures = Counter(data["connect_failures"])
        tally.errors = Counter(data["errors"])
        tally.closes = Counter(data["closes"])
        return tally

    def merge(self, other: Tally) -> None:
        self.connect.merge(other.connect)
        self.latency.merge(other.latency)
        self.attempted += other.attempted
        self.connected += other.connected
        self.connect_failures.update(other.connect_failures)
        self.deliveries += other.deliveries
        self.duplicates += other.duplicates
        self.errors.update(other.errors)
        self.closes.update(other.closes)
        if other.sent and (self.sent == 0 or other.first_send_ns < self.first_send_ns):
            self.first_send_ns = other.first_send_ns
        self.sent += other.sent
        self.refused += other.refused
        self.unconfirmed += other.unconfirmed
        self.last_receive_ns = max(self.last_receive_ns, other.last_receive_ns)

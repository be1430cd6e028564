"""The progress line on stderr: one `\\r`-rewritten line while the run goes, gone at the end."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

BAR_WIDTH = 20
EVERY = 0.2  # seconds between redraws


class Progress:
    """Adds up the shards' latest progress events and redraws at most every EVERY s."""

    def __init__(self, scenario: str, expected: int, stream: TextIO | None = None,
                 *, enabled: bool = True) -> None:
        self.scenario = scenario
        self.expected = expected  # deliveries the run should end with (0: unknown yet)
        self.clients = 0
        self.phase = "starting"
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.shards: dict[int, dict[str, Any]] = {}
        self.started = time.monotonic()
        self._drawn = 0.0
        self._width = 0

    def update(self, shard: int, event: dict[str, Any]) -> None:
        self.shards[shard] = event
        self.draw()

    def set_phase(self, phase: str) -> None:
        self.phase = phase
        self.draw(force=True)

    def total(self, key: str) -> int:
        return sum(int(event.get(key, 0)) for event in self.shards.values())

    def line(self) -> str:
        done, goal = self._fraction()
        filled = int(BAR_WIDTH * done / goal) if goal else 0
        bar = "#" * min(BAR_WIDTH, filled) + "-" * (BAR_WIDTH - min(BAR_WIDTH, filled))
        parts = [f"{self.scenario} [{bar}] {self.phase}",
                 f"signed in {self.total('signed_in')}",
                 f"connected {self.total('connected')}/{self.clients}"]
        if failed := self.total("failed"):
            parts.append(f"failed {failed}")
        if self.scenario != "connect":
            parts.append(f"sent {self.total('sent')}")
            delivered = self.total("delivered")
            parts.append(f"delivered {delivered}/{self.expected}" if self.expected
                         else f"delivered {delivered}")
        parts.append(f"{time.monotonic() - self.started:.1f}s")
        return "  ".join(parts)

    def _fraction(self) -> tuple[int, int]:
        if self.phase in ("signing in",):
            return self.total("signed_in"), self.clients
        if self.phase in ("connecting", "holding") or self.scenario == "connect":
            return self.total("connected") + self.total("failed"), self.clients
        return self.total("delivered"), self.expected

    def draw(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not force and now - self._drawn < EVERY):
            return
        self._drawn = now
        text = self.line()
        self.stream.write("\r" + text.ljust(self._width))
        self.stream.flush()
        self._width = len(text)

    def clear(self) -> None:
        if self.enabled and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
            self._width = 0

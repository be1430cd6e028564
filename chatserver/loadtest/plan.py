"""What a run does: the validated options, the server URLs, and each shard's share.

A Plan is plain data (JSON-able) so a shard in another process gets exactly the same one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

SCENARIOS = ("connect", "fanout", "chat", "storm")
MAX_SEQ = 10_000_000  # per publisher; receivers refuse larger ids instead of growing memory


class PlanError(ValueError):
    """An option is unusable; the message says which and why."""


class RunError(Exception):
    """The run cannot go on (server unreachable, sign-in refused...); the message says why."""


@dataclass(frozen=True)
class Target:
    """One server URL: where to sign in, where to open sockets, which Origin to send."""

    base: str  # http(s)://host:port[/prefix], no trailing slash
    ws: str
    origin: str

    @property
    def login(self) -> str:
        return self.base + "/auth/login"

    @property
    def me(self) -> str:
        return self.base + "/auth/me"

    @property
    def cookie(self) -> str:
        """The name the server reads the token from: behind https its cookies are Secure,
        hence __Host- prefixed; on plain http (local, or a benchmark on an IP origin) the
        original design's name is read."""
        return "__Host-authToken" if self.base.startswith("https:") else "authToken"


def parse_target(url: str, origin: str | None = None) -> Target:
    """Accept http(s)://host[:port][/prefix] or its ws(s):// form, with or without /ws."""
    parts = urlsplit(url.strip())
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    if scheme not in ("http", "https") or not parts.hostname:
        raise PlanError(f"--url {url!r}: expected http://host:port (or https, ws, wss)")
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise PlanError(f"--url {url!r}: bad port") from None
    path = parts.path.rstrip("/")
    if path.endswith("/ws"):
        path = path[: -len("/ws")]
    base = f"{scheme}://{parts.netloc}{path}"
    ws_scheme = "wss" if scheme == "https" else "ws"
    return Target(base=base, ws=f"{ws_scheme}://{parts.netloc}{path}/ws",
                  origin=(origin or f"{scheme}://{parts.netloc}").rstrip("/"))


@dataclass(frozen=True)
class Plan:
    scenario: str
    targets: tuple[Target, ...]
    clients: int
    run_id: str
    procs: int = 1
    concurrency: int = 100
    private_key_pem: str | None = None  # mint tokens; None means the dev sign-in
    password: str = ""
    connect_timeout: float = 10.0
    deadline: float = 300.0
    grace: float = 5.0
    hold: float = 0.0  # connect: seconds to keep the sockets open
    messages: int = 1000  # fanout
    inflight: int = 50  # fanout
    publish_rate: float = 0.0  # fanout: messages/s, 0 = as fast as the window allows
    rate: float = 1.0  # chat: messages/s per client
    duration: float = 10.0  # chat
    size: int = 0  # pad each message text to at least this many characters
    rooms: int = 20  # storm: rooms the clients are spread over, one publisher each
    warmup: float = 3.0  # storm: seconds of traffic before the instance is stopped
    after: float = 2.0  # storm: seconds of traffic once every dropped client resumed
    stop_pid: int | None = None  # storm: the server process to SIGTERM
    stop_cmd: str | None = None  # storm: or the shell command that stops it
    resume_timeout: float = 60.0  # storm: seconds for every dropped client to resume
    latency_budget: float = 250.0  # storm: ms the survivors' p99 must stay under

    def check(self) -> Plan:
        if self.scenario not in SCENARIOS:
            raise PlanError(f"unknown scenario {self.scenario!r}")
        if not self.targets:
            raise PlanError("give at least one --url")
        _at_least("--clients", self.clients, 1)
        _at_least("--procs", self.procs, 1)
        _at_least("--concurrency", self.concurrency, 1)
        if self.procs > self.clients:
            raise PlanError(f"--procs {self.procs} is more than --clients {self.clients}")
        for name, value in (("--connect-timeout", self.connect_timeout),
                            ("--deadline", self.deadline)):
            if value <= 0:
                raise PlanError(f"{name} {value}: must be more than 0")
        for name, value in (("--grace", self.grace), ("--hold", self.hold),
                            ("--publish-rate", self.publish_rate), ("--size", self.size)):
            if value < 0:
                raise PlanError(f"{name} {value}: must not be negative")
        if self.scenario == "fanout":
            _at_least("--messages", self.messages, 1)
            _at_least("--inflight", self.inflight, 1)
            if self.messages > MAX_SEQ:
                raise PlanError(f"--messages {self.messages}: at most {MAX_SEQ}")
        if self.scenario == "storm":
            self._check_storm()
        if self.scenario == "chat":
            if self.rate <= 0 or self.duration <= 0:
                raise PlanError("--rate and --duration must be more than 0")
            if self.per_client_messages() > MAX_SEQ:
                raise PlanError(f"--rate x --duration: at most {MAX_SEQ} messages per client")
        return self

    def _check_storm(self) -> None:
        _at_least("--rooms", self.rooms, 1)
        if self.rooms > self.clients:
            raise PlanError(f"--rooms {self.rooms} is more than --clients {self.clients}")
        if (self.stop_pid is None) == (self.stop_cmd is None):
            raise PlanError("storm needs what to stop: --stop-pid PID or --stop-cmd CMD")
        if len(self.targets) < 2:
            raise PlanError("storm needs two or more --url: the one stopped and the rest")
        if self.rate <= 0:
            raise PlanError(f"--rate {self.rate}: must be more than 0")
        for name, value in (("--warmup", self.warmup), ("--resume-timeout",
                            self.resume_timeout), ("--latency-budget", self.latency_budget)):
            if value <= 0:
                raise PlanError(f"{name} {value}: must be more than 0")
        if self.after < 0:
            raise PlanError(f"--after {self.after}: must not be negative")

    def room_of(self, index: int) -> str:
        """storm: client i is in room i mod --rooms; the room's publisher is client r."""
        return f"st-{self.run_id}-{index % self.rooms}"

    def per_client_messages(self) -> int:
        """chat: how many messages each client sends."""
        return max(1, round(self.rate * self.duration))

    def shard_indices(self, shard: int) -> range:
        """Client numbers of one shard: a contiguous block, so each spreads over every URL."""
        return range(shard * self.clients // self.procs, (shard + 1) * self.clients // self.procs)

    @property
    def publisher(self) -> int:
        """fanout: the publisher's client number, after the subscribers (on shard 0)."""
        return self.clients

    def username(self, index: int) -> str:
        return f"lt-{self.run_id}-{index}"

    def target(self, index: int) -> Target:
        return self.targets[index % len(self.targets)]

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Plan:
        fields = dict(data)
        fields["targets"] = tuple(Target(**t) for t in data["targets"])
        return cls(**fields)


def _at_least(name: str, value: int, low: int) -> None:
    if value < low:
        raise PlanError(f"{name} {value}: must be at least {low}")

"""The local registry (room -> connections, user -> connections) and fan-out.

A broadcast is framed once per worker; the frames of one event-loop pass are joined and
written to each member once (one write per client per pass, however many messages).
Connections that are resuming a room get live payloads buffered until their replay is
done, then deduplicated by id, so a resume has no gap and no duplicate.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from .connection import Connection
from .protocol import RESUME_BACKLOG, message_id_of, parse_id, text_frame

MAX_REPLAY_BUFFER = 10000  # live payloads held for one resuming connection


class Room:
    __slots__ = (
        "joining", "members", "name", "queue", "replaying", "subscribed", "users", "watermarks"
    )

    def __init__(self, name: str) -> None:
        self.name = name
        self.members: set[Connection] = set()
        self.replaying: dict[Connection, list[bytes]] = {}
        # Resumed connections whose replay read further than this worker's live stream has
        # delivered yet: they stay buffered until the live position reaches their mark.
        self.watermarks: dict[Connection, tuple[int, int]] = {}
        self.queue: list[bytes] = []
        self.users: dict[str, int] = {}  # sub -> local connections in this room
        self.joining = 0  # joins under way: the room must outlive their awaits
        # Resolved once the broker subscription exists; joiners wait on it, not on Redis.
        self.subscribed: asyncio.Future[None] = asyncio.get_running_loop().create_future()


class Hub:
    """The broker's Sink: what it receives is delivered here. Counts, per room, each
    user's local connections: the broker hears only of a user's first and last."""

    def __init__(
        self,
        *,
        position: Callable[[str], tuple[int, int] | None] = lambda room: None,
        on_delivered: Callable[[int], None] | None = None,
    ) -> None:
        self._position = position  # the broker's last delivered id per room
        self.rooms: dict[str, Room] = {}
        self.users: dict[str, set[Connection]] = {}
        self.connections: set[Connection] = set()
        self.emptied = asyncio.Event()  # set while no connection is registered
        self.emptied.set()
        self._on_delivered = on_delivered or (lambda n: None)
        self._loop: asyncio.AbstractEventLoop | None = None

    # ------------------------------------------------------------ broker side

    def deliver_room(self, room_name: str, payload: bytes) -> None:
        """Queue a payload for every member of a room; written at the end of this pass."""
        room = self.rooms.get(room_name)
        if room is None:
            return
        if not room.queue:
            if self._loop is None:
                self._loop = asyncio.get_running_loop()
            self._loop.call_soon(self._flush, room)
        room.queue.append(text_frame(payload))
        for conn, buffered in room.replaying.items():
            buffered.append(payload)
            if len(buffered) > MAX_REPLAY_BUFFER:
                conn.kick(RESUME_BACKLOG)

    def _flush(self, room: Room) -> None:
        frames = room.queue
        if not frames:
            return
        room.queue = []
        blob = frames[0] if len(frames) == 1 else b"".join(frames)
        for conn in room.members:
            conn.write(blob)
        self._on_delivered(len(frames) * len(room.members))
        if room.watermarks:
            self._promote_caught_up(room)

    def _promote_caught_up(self, room: Room) -> None:
        live = self._position(room.name)
        if live is None:
            return
        for conn, mark in list(room.watermarks.items()):
            if live >= mark:
                del room.watermarks[conn]
                self._promote(room, conn, mark)

    def _promote(self, room: Room, conn: Connection, after: tuple[int, int]) -> None:
        """Write the held payloads newer than `after`, then make conn a live member."""
        for payload in room.replaying.pop(conn, []):
            message_id = message_id_of(payload)
            if message_id is None or parse_id(message_id) > after:
                conn.write(text_frame(payload))
        room.members.add(conn)

    def deliver_user(self, sub: str, payload: bytes) -> None:
        conns = self.users.get(sub)
        if not conns:
            return
        frame = text_frame(payload)
        for conn in conns:
            conn.write(frame)
        self._on_delivered(len(conns))

    # ------------------------------------------------------------ connections

    def register(self, conn: Connection) -> bool:
        """Add a connection; True when it is its user's first here (subscribe the user)."""
        self.connections.add(conn)
        self.emptied.clear()
        conns = self.users.setdefault(conn.user.sub, set())
        conns.add(conn)
        return len(conns) == 1

    def unregister(self, conn: Connection) -> bool:
        """Remove a connection; True when its user has no connection left here."""
        self.connections.discard(conn)
        if not self.connections:
            self.emptied.set()
        conns = self.users.get(conn.user.sub)
        if conns is None:
            return False
        conns.discard(conn)
        if conns:
            return False
        del self.users[conn.user.sub]
        return True

    def user_connections(self, sub: str) -> int:
        return len(self.users.get(sub, ()))

    # ------------------------------------------------------------------ rooms

    def reserve(self, name: str) -> tuple[Room, bool]:
        """Hold the room open for a join under way; True when it is new here (the caller
        subscribes the broker and resolves room.subscribed). End with add or release."""
        room = self.rooms.get(name)
        created = room is None
        if room is None:
            room = self.rooms[name] = Room(name)
        room.joining += 1
        return room, created

    def release(self, name: str) -> None:
        """A reserved join that failed."""
        room = self.rooms.get(name)
        if room is not None:
            room.joining -= 1

    def close_room_if_empty(self, name: str) -> bool:
        """Drop an empty room; True when dropped (unsubscribe the broker)."""
        room = self.rooms.get(name)
        if room is None or room.members or room.replaying or room.users or room.joining:
            return False
        self._flush(room)
        del self.rooms[name]
        return True

    def add(self, conn: Connection, name: str, *, replaying: bool = False) -> bool:
        """Complete a reserved join; True when it is its user's first connection in the
        room. `replaying`: live payloads are held for conn until finish_replay."""
        room = self.rooms[name]
        room.joining -= 1
        self._flush(room)
        if replaying:
            room.replaying[conn] = []
        else:
            room.members.add(conn)
        conn.rooms.add(name)
        count = room.users.get(conn.user.sub, 0) + 1
        room.users[conn.user.sub] = count
        return count == 1

    def finish_replay(self, conn: Connection, name: str, last_id: str | None) -> None:
        """After the replay up to `last_id`: go live once this worker's live stream has
        delivered that far (a replay can read past it, e.g. right after a Redis blip)."""
        room = self.rooms[name]
        self._flush(room)
        mark = parse_id(last_id) if last_id else (-1, -1)
        live = self._position(name)
        if last_id is None or (live is not None and live >= mark):
            self._promote(room, conn, mark)
        else:
            room.watermarks[conn] = mark

    def remove(self, conn: Connection, name: str) -> bool:
        """Take conn out of a room; True when its user has no connection left in it."""
        room = self.rooms.get(name)
        conn.rooms.discard(name)
        if room is None:
            return False
        self._flush(room)
        room.watermarks.pop(conn, None)
        if conn in room.members:
            room.members.discard(conn)
        elif room.replaying.pop(conn, None) is None:
            return False  # not a member: nothing to count down
        count = room.users.get(conn.user.sub, 0) - 1
        if count > 0:
            room.users[conn.user.sub] = count
            return False
        room.users.pop(conn.user.sub, None)
        return True

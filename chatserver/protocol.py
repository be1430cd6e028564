"""Wire protocol v1, the whole vocabulary of /ws: client frames parsed into commands,
one builder per server frame (JSON bytes, encoded once), and every close as a named value.

Pure: no I/O, no aiohttp, no Redis. docs/PROTOCOL.md is the contract this implements.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from typing import Any, Final

# ------------------------------------------------------------------ closes


@dataclass(frozen=True, slots=True)
class Close:
    """A close the server sends: code, reason, and whether the client reconnects."""

    code: int
    reason: str
    retry: bool  # True: reconnect with backoff and jitter; False: stay closed

    def because(self, detail: str) -> Close:
        return Close(self.code, f"{self.reason}: {detail}", self.retry)


# Terminal. The browser client decides by code alone (static/socket.js).
SIGNED_OUT: Final = Close(1000, "signed out", retry=False)
NOT_SIGNED_IN: Final = Close(1008, "missing token", retry=False)
INVALID_TOKEN: Final = Close(1008, "invalid token", retry=False)  # .because(reason)
FLOODING: Final = Close(1008, "rate limit exceeded", retry=False)
REVOKED: Final = Close(1008, "revoked", retry=False)  # a token signed out (copied cookie)
# aiohttp's reader sends this one itself for a frame over CHAT_MAX_MESSAGE_BYTES.
TOO_LARGE_FRAME: Final = Close(1009, "message too big", retry=False)
# Retry.
SHUTTING_DOWN: Final = Close(1001, "server shutting down", retry=True)
KEYS_UNAVAILABLE: Final = Close(1011, "auth keys unavailable, retry", retry=True)
SLOW_CONSUMER: Final = Close(1013, "slow consumer", retry=True)
RESUME_BACKLOG: Final = Close(1013, "resume backlog", retry=True)
BROKER_DOWN: Final = Close(1013, "broker unavailable", retry=True)
DRAINING: Final = Close(1013, "server shutting down", retry=True)
SERVER_FULL: Final = Close(1013, "server full", retry=True)
USER_FULL: Final = Close(1013, "too many connections for this user", retry=True)
# Retry after POST /auth/refresh.
TOKEN_EXPIRED: Final = Close(4001, "token expired", retry=True)

CLOSES: Final = (
    SIGNED_OUT, NOT_SIGNED_IN, INVALID_TOKEN, FLOODING, REVOKED, TOO_LARGE_FRAME, SHUTTING_DOWN,
    KEYS_UNAVAILABLE, SLOW_CONSUMER, RESUME_BACKLOG, BROKER_DOWN, DRAINING, SERVER_FULL,
    USER_FULL, TOKEN_EXPIRED,
)

# ------------------------------------------------------------ error codes

# Error frame codes; the connection stays open after any of them.
BAD_REQUEST: Final = "bad_request"
TOO_LARGE: Final = "too_large"
RATE_LIMITED: Final = "rate_limited"
FORBIDDEN: Final = "forbidden"
UNAVAILABLE: Final = "unavailable"

# ------------------------------------------------------------- identifiers

LOBBY: Final = "lobby"
ROOM_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
ROOM_RULE = "room must be 1-64 characters of A-Z a-z 0-9 _ . -"
# A user id as our issuers make them (Cognito: a UUID; dev: a UUIDv5); no whitespace or
# control characters, since a sub is framed into per-user broker traffic.
SUB = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}")
_STREAM_ID = re.compile(r"([0-9]{1,20})-([0-9]{1,20})")  # ASCII digits only, not \d
MAX_ID_PART: Final = 2**64 - 1
MAX_REF_CHARS: Final = 64
MAX_EPOCH_CHARS: Final = 64

# Every stored message frame starts with these bytes, then the id, then `"`: the
# pub/sub path reads the id without parsing JSON (see message_id_of), and the broker's
# publish script is handed them (never a copy of its own).
MESSAGE_PREFIX: Final = b'{"type":"message","id":"'


def is_message_id(value: object) -> bool:
    """A stream id `<ms>-<seq>`, both parts ASCII digits that fit in 64 bits."""
    if not isinstance(value, str):
        return False
    match = _STREAM_ID.fullmatch(value)
    return match is not None and all(int(part) <= MAX_ID_PART for part in match.groups())


def parse_id(message_id: str) -> tuple[int, int]:
    """Stream ids `<ms>-<seq>` order as pairs of integers, not as strings."""
    ms, _, seq = message_id.partition("-")
    return int(ms), int(seq or 0)


# ------------------------------------------------------------ client frames


class ProtocolError(Exception):
    """A client frame is unusable; answer with an error frame and keep the connection."""

    def __init__(
        self, code: str, detail: str, ref: str | None = None, *, room: str | None = None
    ) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.ref = ref
        self.room = room  # set on errors about one room, so the client knows which


@dataclass(frozen=True, slots=True)
class Publish:
    room: str
    text: str
    ref: str | None = None


@dataclass(frozen=True, slots=True)
class Join:
    room: str
    since: str | None = None
    epoch: str | None = None
    ref: str | None = None


@dataclass(frozen=True, slots=True)
class Leave:
    room: str
    ref: str | None = None


@dataclass(frozen=True, slots=True)
class Members:
    room: str
    ref: str | None = None


@dataclass(frozen=True, slots=True)
class Direct:
    to: str
    text: str
    ref: str | None = None

    @property
    def room(self) -> None:
        return None  # about no room: every command answers .room and .ref


Command = Publish | Join | Leave | Members | Direct


def parse_client_frame(data: str, *, max_text_chars: int) -> Command:
    """Turn one text frame into a command, or raise ProtocolError saying what is wrong."""
    try:
        frame = json.loads(data)
    except (ValueError, RecursionError):
        raise ProtocolError(BAD_REQUEST, "frame is not valid JSON") from None
    if not isinstance(frame, dict):
        raise ProtocolError(BAD_REQUEST, "frame must be a JSON object")
    ref = frame.get("ref")
    if ref is not None and not (_is_text(ref) and len(ref) <= MAX_REF_CHARS):
        raise ProtocolError(BAD_REQUEST, f"ref must be a string of at most {MAX_REF_CHARS}")
    kind = frame.get("type", "publish")
    if kind == "publish":
        room = _room(frame.get("room", LOBBY), ref)
        return Publish(room, _text(frame, max_text_chars, ref), ref)
    if kind == "join":
        room = _room(frame.get("room"), ref)
        since, epoch = frame.get("since"), frame.get("epoch")
        if since is not None and not is_message_id(since):
            raise ProtocolError(
                BAD_REQUEST, "since must be a message id like 1700000000000-0", ref, room=room
            )
        if epoch is not None and not (_is_text(epoch) and 0 < len(epoch) <= MAX_EPOCH_CHARS):
            raise ProtocolError(BAD_REQUEST, "epoch must be a string", ref, room=room)
        return Join(room, since, epoch, ref)
    if kind == "leave":
        return Leave(_room(frame.get("room"), ref), ref)
    if kind == "members":
        return Members(_room(frame.get("room"), ref), ref)
    if kind == "direct":
        to = frame.get("to")
        if not isinstance(to, str) or not SUB.fullmatch(to):
            raise ProtocolError(BAD_REQUEST, "to must be a user id", ref)
        return Direct(to, _text(frame, max_text_chars, ref), ref)
    raise ProtocolError(BAD_REQUEST, f"unknown type {str(kind)[:32]!r}", ref)


def _room(value: Any, ref: str | None) -> str:
    if not isinstance(value, str) or not ROOM_NAME.fullmatch(value):
        raise ProtocolError(BAD_REQUEST, ROOM_RULE, ref)
    return value


def _text(frame: dict[str, Any], max_chars: int, ref: str | None) -> str:
    text = frame.get("message")
    if not isinstance(text, str) or not _is_text(text) or not text.strip():
        raise ProtocolError(BAD_REQUEST, "message must be a non-empty string", ref)
    if len(text) > max_chars:
        raise ProtocolError(TOO_LARGE, f"message is over {max_chars} characters", ref)
    return text


def _is_text(value: Any) -> bool:
    """A string that is valid Unicode: JSON's \\ud800 escapes can smuggle in a lone
    surrogate, which no UTF-8 frame can carry back out."""
    if not isinstance(value, str):
        return False
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


# ------------------------------------------------------------ server frames


def encode(event: dict[str, Any]) -> bytes:
    return json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode()


def welcome(user: dict[str, Any], rooms: list[str], instance: str) -> bytes:
    return encode({"type": "welcome", "user": user, "rooms": rooms, "instance": instance})


def joined(room: str, epoch: str) -> bytes:
    return encode({"type": "joined", "room": room, "epoch": epoch})


def left(room: str, reason: str | None = None) -> bytes:
    """After a leave; with reason "revoked" when the user may no longer read the room."""
    if reason is None:
        return encode({"type": "left", "room": room})
    return encode({"type": "left", "room": room, "reason": reason})


def recovered(room: str, complete: bool, epoch: str) -> bytes:
    return encode({"type": "recovered", "room": room, "complete": complete, "epoch": epoch})


def ack(ref: str, message_id: str | None) -> bytes:
    return encode({"type": "ack", "ref": ref, "id": message_id})


def members(room: str, found: list[dict[str, str]]) -> bytes:
    return encode({"type": "members", "room": room, "members": found})


def presence(room: str, event: str, user: dict[str, str]) -> bytes:
    """`event` is "join" or "leave"; `user` is {"sub", "username"}."""
    return encode({"type": "presence", "room": room, "event": event, "user": user})


def direct(
    message_id: str, sender: str, username: str, to: str, text: str, ts: int
) -> bytes:
    return encode({
        "type": "direct", "id": message_id, "from": sender, "user": sender,
        "username": username, "to": to, "message": text, "ts": ts,
    })


def error(code: str, detail: str, ref: str | None = None, room: str | None = None) -> bytes:
    event: dict[str, Any] = {"type": "error", "code": code, "detail": detail}
    if ref is not None:
        event["ref"] = ref
    if room is not None:
        event["room"] = room
    return encode(event)


def message_tail(room: str, user: str, username: str, text: str, ts: int) -> bytes:
    """The part of a message frame after its id; the broker prepends prefix and id."""
    body = encode({"room": room, "user": user, "username": username, "message": text, "ts": ts})
    return b'"' + b"," + body[1:]


def message_frame(message_id: str, tail: bytes) -> bytes:
    return MESSAGE_PREFIX + message_id.encode() + tail


def message_id_of(payload: bytes) -> str | None:
    """The id of a stored message frame, or None for any other event (presence...)."""
    if not payload.startswith(MESSAGE_PREFIX):
        return None
    end = payload.find(b'"', len(MESSAGE_PREFIX))
    return payload[len(MESSAGE_PREFIX) : end].decode() if end > 0 else None


def text_frame(payload: bytes) -> bytes:
    """An unmasked, unfragmented RFC 6455 text frame, ready for transport.write().

    Built once per broadcast and written to every recipient as is.
    """
    n = len(payload)
    if n < 126:
        return bytes((0x81, n)) + payload
    if n < 65536:
        return struct.pack("!BBH", 0x81, 126, n) + payload
    return struct.pack("!BBQ", 0x81, 127, n) + payload

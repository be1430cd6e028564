"""Wire protocol v1: client frames parsed into commands, server events encoded to bytes.

Pure: no I/O, no aiohttp, no Redis. Close and error codes are named here, each saying
whether the client should retry. docs/PROTOCOL.md is the contract this implements.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from typing import Any, Final

# Close codes. Retry means "reconnect with backoff and jitter".
CLOSE_NORMAL: Final = 1000  # terminal: signed out, or the client asked
CLOSE_GOING_AWAY: Final = 1001  # retry: shutdown or restart
CLOSE_POLICY: Final = 1008  # terminal until signed in again: bad auth, flooding
CLOSE_TOO_LARGE: Final = 1009  # terminal: the client sent a frame over the limit
CLOSE_INTERNAL: Final = 1011  # retry
CLOSE_TRY_LATER: Final = 1013  # retry, later: slow consumer, overload
CLOSE_TOKEN_EXPIRED: Final = 4001  # refresh the token, then retry

# Error frame codes; the connection stays open after any of them.
BAD_REQUEST: Final = "bad_request"
TOO_LARGE: Final = "too_large"
RATE_LIMITED: Final = "rate_limited"
FORBIDDEN: Final = "forbidden"
UNAVAILABLE: Final = "unavailable"

LOBBY: Final = "lobby"
ROOM_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
STREAM_ID = re.compile(r"(\d{1,20})-(\d{1,20})")
MAX_REF_CHARS: Final = 64
MAX_SUB_CHARS: Final = 128

# Every stored message frame starts with these bytes, then the id, then `"`: the
# pub/sub path reads the id without parsing JSON (see message_id_of).
MESSAGE_PREFIX: Final = b'{"type":"message","id":"'


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


@dataclass(frozen=True, slots=True)
class Leave:
    room: str


@dataclass(frozen=True, slots=True)
class Members:
    room: str


@dataclass(frozen=True, slots=True)
class Direct:
    to: str
    text: str
    ref: str | None = None


Command = Publish | Join | Leave | Members | Direct


def parse_client_frame(data: str, *, max_text_chars: int) -> Command:
    """Turn one text frame into a command, or raise ProtocolError saying what is wrong."""
    try:
        frame = json.loads(data)
    except ValueError:
        raise ProtocolError(BAD_REQUEST, "frame is not valid JSON") from None
    if not isinstance(frame, dict):
        raise ProtocolError(BAD_REQUEST, "frame must be a JSON object")
    ref = frame.get("ref")
    if ref is not None and (not isinstance(ref, str) or len(ref) > MAX_REF_CHARS):
        raise ProtocolError(BAD_REQUEST, f"ref must be a string of at most {MAX_REF_CHARS}")
    kind = frame.get("type", "publish")
    if kind == "publish":
        room = _room(frame.get("room", LOBBY), ref)
        return Publish(room, _text(frame, max_text_chars, ref), ref)
    if kind == "join":
        room = _room(frame.get("room"), ref)
        since, epoch = frame.get("since"), frame.get("epoch")
        if since is not None and not (isinstance(since, str) and STREAM_ID.fullmatch(since)):
            raise ProtocolError(BAD_REQUEST, "since must be a message id like 1700000000000-0", ref)
        if epoch is not None and not (isinstance(epoch, str) and 0 < len(epoch) <= 64):
            raise ProtocolError(BAD_REQUEST, "epoch must be a string", ref)
        return Join(room, since, epoch)
    if kind == "leave":
        return Leave(_room(frame.get("room"), ref))
    if kind == "members":
        return Members(_room(frame.get("room"), ref))
    if kind == "direct":
        to = frame.get("to")
        if not isinstance(to, str) or not 0 < len(to) <= MAX_SUB_CHARS:
            raise ProtocolError(BAD_REQUEST, "to must be a user id", ref)
        return Direct(to, _text(frame, max_text_chars, ref), ref)
    raise ProtocolError(BAD_REQUEST, f"unknown type {str(kind)[:32]!r}", ref)


def _room(value: Any, ref: str | None) -> str:
    if not isinstance(value, str) or not ROOM_NAME.fullmatch(value):
        raise ProtocolError(BAD_REQUEST, "room must be 1-64 characters of A-Z a-z 0-9 _ . -", ref)
    return value


def _text(frame: dict[str, Any], max_chars: int, ref: str | None) -> str:
    text = frame.get("message")
    if not isinstance(text, str) or not text.strip():
        raise ProtocolError(BAD_REQUEST, "message must be a non-empty string", ref)
    if len(text) > max_chars:
        raise ProtocolError(TOO_LARGE, f"message is over {max_chars} characters", ref)
    return text


# ---------------------------------------------------------------- server events


def encode(event: dict[str, Any]) -> bytes:
    return json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode()


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


def parse_id(message_id: str) -> tuple[int, int]:
    """Stream ids `<ms>-<seq>` order as pairs of integers, not as strings."""
    ms, _, seq = message_id.partition("-")
    return int(ms), int(seq or 0)


def error_event(
    code: str, detail: str, ref: str | None = None, room: str | None = None
) -> dict[str, Any]:
    event: dict[str, Any] = {"type": "error", "code": code, "detail": detail}
    if ref is not None:
        event["ref"] = ref
    if room is not None:
        event["room"] = room
    return event


def presence_event(room: str, event: str, user: dict[str, Any]) -> dict[str, Any]:
    return {"type": "presence", "room": room, "event": event, "user": user}


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

"""The wire vocabulary of chatserver/protocol.py: every client frame of docs/PROTOCOL.md
parsed (good and bad), every server-frame builder, RFC 6455 text frames and the closes."""

from __future__ import annotations

import json
import struct
from typing import Any

import pytest

from chatserver import protocol
from chatserver.protocol import (
    BAD_REQUEST,
    CLOSES,
    LOBBY,
    TOO_LARGE,
    Close,
    Direct,
    Join,
    Leave,
    Members,
    ProtocolError,
    Publish,
    is_message_id,
    message_frame,
    message_id_of,
    message_tail,
    parse_client_frame,
    parse_id,
    text_frame,
)

MAX_TEXT = 100
MAX_ID = str(2**64 - 1)
LONE_SURROGATE = '"\\ud800"'  # the JSON escape, as a client would send it


def parse(frame: dict[str, Any] | str) -> protocol.Command:
    data = frame if isinstance(frame, str) else json.dumps(frame)
    return parse_client_frame(data, max_text_chars=MAX_TEXT)


def refused(frame: dict[str, Any] | str) -> ProtocolError:
    with pytest.raises(ProtocolError) as caught:
        parse(frame)
    return caught.value


def fields(payload: bytes) -> dict[str, Any]:
    event = json.loads(payload)
    assert isinstance(event, dict)
    return event


# ------------------------------------------------------------ good client frames


def test_bare_message_publishes_to_lobby() -> None:
    """{"message": ...} without a type is a publish to the lobby, with no ref."""
    assert parse({"message": "hi"}) == Publish(LOBBY, "hi", None)


def test_publish_to_a_room_with_ref() -> None:
    """A publish names its room and carries its ref."""
    frame = {"type": "publish", "room": "r-1.x_y", "message": "hi", "ref": "c1"}
    assert parse(frame) == Publish("r-1.x_y", "hi", "c1")


def test_publish_without_room_goes_to_lobby() -> None:
    """A typed publish with no room defaults to the lobby."""
    assert parse({"type": "publish", "message": "hi"}) == Publish(LOBBY, "hi", None)


def test_publish_keeps_text_as_sent() -> None:
    """The message text is kept exactly, surrounding whitespace and non-ASCII included."""
    assert parse({"message": "  héllo 👋 "}) == Publish(LOBBY, "  héllo 👋 ")


def test_message_of_exactly_max_chars_is_accepted() -> None:
    """max_text_chars is inclusive."""
    command = parse({"message": "x" * MAX_TEXT})
    assert isinstance(command, Publish) and len(command.text) == MAX_TEXT


def test_join_without_since() -> None:
    """A plain join has no since and no epoch."""
    assert parse({"type": "join", "room": "r"}) == Join("r", None, None, None)


def test_join_with_since_and_epoch() -> None:
    """A resuming join carries since, epoch and ref."""
    frame = {"type": "join", "room": "r", "since": "1700000000000-3", "epoch": "e1", "ref": "j"}
    assert parse(frame) == Join("r", "1700000000000-3", "e1", "j")


def test_join_with_largest_since() -> None:
    """Both parts of since may be as large as 2^64-1."""
    command = parse({"type": "join", "room": "r", "since": f"{MAX_ID}-{MAX_ID}"})
    assert isinstance(command, Join) and command.since == f"{MAX_ID}-{MAX_ID}"


def test_join_with_epoch_of_64_chars() -> None:
    """An epoch of 64 characters is the longest accepted."""
    command = parse({"type": "join", "room": "r", "epoch": "e" * 64})
    assert isinstance(command, Join) and command.epoch == "e" * 64


@pytest.mark.parametrize(("kind", "command"), [("leave", Leave), ("members", Members)])
def test_room_commands_carry_room_and_ref(kind: str, command: type[Leave | Members]) -> None:
    """leave and members name their room and keep their ref."""
    assert parse({"type": kind, "room": "r", "ref": "x"}) == command("r", "x")


def test_direct_carries_to_text_and_ref() -> None:
    """A direct names its recipient, is about no room, and keeps its ref."""
    to = "3f2b8c1e-1111-4222-8333-944455556666"
    command = parse({"type": "direct", "to": to, "message": "psst", "ref": "c2"})
    assert command == Direct(to, "psst", "c2")
    assert command.room is None


def test_direct_to_of_128_chars_is_accepted() -> None:
    """A user id of 128 characters is the longest accepted."""
    command = parse({"type": "direct", "to": "a" * 128, "message": "hi"})
    assert isinstance(command, Direct) and command.to == "a" * 128


def test_ref_of_64_chars_is_accepted() -> None:
    """A ref of 64 characters is the longest accepted."""
    assert parse({"message": "hi", "ref": "r" * 64}) == Publish(LOBBY, "hi", "r" * 64)


# ------------------------------------------------------------- bad client frames


@pytest.mark.parametrize(
    "data",
    ["", "hello", "{", '{"message": "hi"', "{'message': 'hi'}", '{"message": "hi"} x'],
    ids=["empty", "word", "open-brace", "unterminated", "single-quotes", "trailing"],
)
def test_not_json_is_bad_request(data: str) -> None:
    """Text that is not JSON is a bad_request, with no ref."""
    error = refused(data)
    assert (error.code, error.ref) == (BAD_REQUEST, None)


@pytest.mark.parametrize("data", ["[" * 100_000, '{"a":' * 100_000], ids=["arrays", "objects"])
def test_deeply_nested_json_is_bad_request(data: str) -> None:
    """JSON nested past the recursion limit is a bad_request, not a RecursionError."""
    assert refused(data).code == BAD_REQUEST


@pytest.mark.parametrize("data", ["[]", '["message"]', '"hi"', "5", "null", "true"])
def test_json_that_is_not_an_object_is_bad_request(data: str) -> None:
    """A JSON array, string, number or null is a bad_request."""
    assert refused(data).code == BAD_REQUEST


@pytest.mark.parametrize("kind", ["subscribe", "", None, 5, ["join"], {"t": 1}])
def test_unknown_type_is_bad_request_with_ref(kind: object) -> None:
    """An unknown type is a bad_request that names it and keeps the frame's ref."""
    error = refused({"type": kind, "room": "r", "message": "hi", "ref": "u1"})
    assert (error.code, error.ref) == (BAD_REQUEST, "u1")
    assert "unknown type" in error.detail


def test_unknown_type_detail_is_bounded() -> None:
    """A huge type value is cut in the error's detail."""
    error = refused({"type": "x" * 10_000})
    assert len(error.detail) < 100


BAD_ROOMS = {
    "empty": "",
    "65-chars": "r" * 65,
    "space": "my room",
    "trailing-newline": "lobby\n",
    "slash": "a/b",
    "unicode": "café",
    "fullwidth": "\uff4c\uff4f\uff42\uff42\uff59",  # fullwidth "lobby"
    "int": 5,
    "null": None,
    "list": ["lobby"],
}


@pytest.mark.parametrize("kind", ["publish", "join", "leave", "members"])
@pytest.mark.parametrize("room", BAD_ROOMS.values(), ids=BAD_ROOMS.keys())
def test_bad_room_name_is_bad_request_with_ref(kind: str, room: object) -> None:
    """Every room command refuses a bad room name as bad_request, keeping the ref."""
    error = refused({"type": kind, "room": room, "message": "hi", "ref": "b1"})
    assert (error.code, error.ref) == (BAD_REQUEST, "b1")
    assert "room" in error.detail


@pytest.mark.parametrize("kind", ["join", "leave", "members"])
def test_room_command_without_room_is_bad_request(kind: str) -> None:
    """join, leave and members need a room (only publish defaults to the lobby)."""
    error = refused({"type": kind, "ref": "m1"})
    assert (error.code, error.ref) == (BAD_REQUEST, "m1")


@pytest.mark.parametrize(
    "ref_json",
    ['"' + "r" * 65 + '"', "5", "true", '["c1"]', '{"r": 1}', LONE_SURROGATE],
    ids=["65-chars", "int", "bool", "list", "object", "lone-surrogate"],
)
def test_bad_ref_is_bad_request_without_ref(ref_json: str) -> None:
    """A ref that is too long, not a string or not valid Unicode is refused and not echoed."""
    error = refused('{"message": "hi", "ref": ' + ref_json + "}")
    assert (error.code, error.ref) == (BAD_REQUEST, None)
    assert "ref" in error.detail


BAD_MESSAGES = {
    "empty": '""',
    "spaces": '"   "',
    "whitespace": '"\\n\\t \\r"',
    "int": "5",
    "null": "null",
    "list": '["hi"]',
    "object": '{"text": "hi"}',
    "lone-surrogate": LONE_SURROGATE,
    "surrogate-in-text": '"hi \\udc00 there"',
}


@pytest.mark.parametrize("message", BAD_MESSAGES.values(), ids=BAD_MESSAGES.keys())
@pytest.mark.parametrize("head", ['"type": "publish", "room": "r"', '"type": "direct", "to": "bob"'])
def test_bad_message_is_bad_request_with_ref(head: str, message: str) -> None:
    """publish and direct refuse an empty, blank, non-string or non-Unicode message."""
    error = refused("{" + head + ', "ref": "m2", "message": ' + message + "}")
    assert (error.code, error.ref) == (BAD_REQUEST, "m2")


@pytest.mark.parametrize("frame", [{"type": "publish"}, {"type": "direct", "to": "bob"}])
def test_missing_message_is_bad_request(frame: dict[str, Any]) -> None:
    """A publish or direct without a message is a bad_request."""
    error = refused(dict(frame, ref="m3"))
    assert (error.code, error.ref) == (BAD_REQUEST, "m3")


@pytest.mark.parametrize("frame", [
    {"message": "x" * (MAX_TEXT + 1)},
    {"type": "publish", "room": "r", "message": "é" * (MAX_TEXT + 1)},
    {"type": "direct", "to": "bob", "message": "x" * (MAX_TEXT + 1)},
])
def test_message_over_max_chars_is_too_large_with_ref(frame: dict[str, Any]) -> None:
    """A message one character over max_text_chars is too_large, keeping the ref."""
    error = refused(dict(frame, ref="big"))
    assert (error.code, error.ref) == (TOO_LARGE, "big")


BAD_SINCE = {
    "arabic-indic-digits": "\u0661\u0667\u0660\u0660-\u0660",  # \d would match
    "fullwidth-digits": "\uff11-\uff10",
    "ms-over-2^64-1": f"{2**64}-0",
    "seq-over-2^64-1": f"0-{2**64}",
    "21-digits": "1" * 21 + "-0",
    "no-seq": "1700000000000",
    "empty-seq": "1-",
    "three-parts": "1-2-3",
    "negative": "-1-0",
    "leading-space": " 1-0",
    "trailing-newline": "1-0\n",
    "empty": "",
    "int": 1700000000000,
    "list": ["1-0"],
}


@pytest.mark.parametrize("since", BAD_SINCE.values(), ids=BAD_SINCE.keys())
def test_bad_since_is_bad_request_with_ref_and_room(since: object) -> None:
    """A since that is not an ASCII `<ms>-<seq>` of 64-bit parts names the room and ref."""
    error = refused({"type": "join", "room": "r", "since": since, "ref": "s1"})
    assert (error.code, error.ref, error.room) == (BAD_REQUEST, "s1", "r")
    assert "since" in error.detail


@pytest.mark.parametrize(
    "epoch_json", ['""', '"' + "e" * 65 + '"', "5", '["e"]', LONE_SURROGATE],
    ids=["empty", "65-chars", "int", "list", "lone-surrogate"],
)
def test_bad_epoch_is_bad_request_with_ref_and_room(epoch_json: str) -> None:
    """An epoch that is empty, over 64 characters or not a string names the room and ref."""
    error = refused('{"type": "join", "room": "r", "ref": "e1", "epoch": ' + epoch_json + "}")
    assert (error.code, error.ref, error.room) == (BAD_REQUEST, "e1", "r")
    assert "epoch" in error.detail


BAD_TO = {
    "newline": "bob\nalice",
    "trailing-newline": "bob\n",
    "space": "bob alice",
    "nul": "bob\x00",
    "escape": "bob\x1b[2J",
    "del": "bob\x7f",
    "129-chars": "a" * 129,
    "empty": "",
    "leading-dash": "-bob",
    "unicode": "böb",
    "int": 5,
    "null": None,
}


@pytest.mark.parametrize("to", BAD_TO.values(), ids=BAD_TO.keys())
def test_bad_direct_to_is_bad_request_with_ref(to: object) -> None:
    """direct.to must be a user id: no whitespace, control characters or overlong ids."""
    error = refused({"type": "direct", "to": to, "message": "hi", "ref": "d1"})
    assert (error.code, error.ref) == (BAD_REQUEST, "d1")
    assert "to" in error.detail


# ---------------------------------------------------------------- server frames


def test_welcome_fields() -> None:
    """welcome has type, user, rooms and instance."""
    user = {"sub": "s1", "username": "alice", "groups": []}
    assert fields(protocol.welcome(user, ["lobby"], "host:1")) == {
        "type": "welcome", "user": user, "rooms": ["lobby"], "instance": "host:1",
    }


def test_joined_fields() -> None:
    """joined has type, room and epoch."""
    assert fields(protocol.joined("r", "e1")) == {"type": "joined", "room": "r", "epoch": "e1"}


def test_left_fields() -> None:
    """left has type and room."""
    assert fields(protocol.left("r")) == {"type": "left", "room": "r"}


@pytest.mark.parametrize("complete", [True, False])
def test_recovered_fields(complete: bool) -> None:
    """recovered has type, room, a boolean complete and epoch."""
    assert fields(protocol.recovered("r", complete, "e2")) == {
        "type": "recovered", "room": "r", "complete": complete, "epoch": "e2",
    }


def test_ack_fields() -> None:
    """ack has type, ref and id."""
    assert fields(protocol.ack("c1", "5-0")) == {"type": "ack", "ref": "c1", "id": "5-0"}


def test_members_fields() -> None:
    """members has type, room and the list of {sub, username}."""
    found = [{"sub": "s1", "username": "alice"}, {"sub": "s2", "username": "bob"}]
    assert fields(protocol.members("r", found)) == {"type": "members", "room": "r", "members": found}


@pytest.mark.parametrize("event", ["join", "leave"])
def test_presence_fields(event: str) -> None:
    """presence has type, room, event and user."""
    user = {"sub": "s1", "username": "alice"}
    assert fields(protocol.presence("r", event, user)) == {
        "type": "presence", "room": "r", "event": event, "user": user,
    }


def test_direct_fields() -> None:
    """direct has type, id, from, user (the sender), username, to, message and ts."""
    assert fields(protocol.direct("uuid-1", "s1", "alice", "s2", "psst", 1700)) == {
        "type": "direct", "id": "uuid-1", "from": "s1", "user": "s1", "username": "alice",
        "to": "s2", "message": "psst", "ts": 1700,
    }


def test_error_fields_without_ref_or_room() -> None:
    """error has type, code and detail; no ref or room key unless given."""
    assert fields(protocol.error(BAD_REQUEST, "nope")) == {
        "type": "error", "code": BAD_REQUEST, "detail": "nope",
    }


def test_error_fields_with_ref_and_room() -> None:
    """error carries ref and room when it is about them."""
    assert fields(protocol.error(TOO_LARGE, "big", ref="c1", room="r")) == {
        "type": "error", "code": TOO_LARGE, "detail": "big", "ref": "c1", "room": "r",
    }


def test_builders_write_non_ascii_as_utf8() -> None:
    """Frames are compact UTF-8 JSON, not \\u escapes."""
    assert protocol.left("r") == b'{"type":"left","room":"r"}'
    assert "é".encode() in protocol.error(BAD_REQUEST, "é")


def test_message_frame_fields() -> None:
    """message_tail + message_frame is a message frame with exactly the documented fields."""
    frame = message_frame("1700-2", message_tail("r", "s1", "alice", "hi", 1700))
    assert fields(frame) == {
        "type": "message", "id": "1700-2", "room": "r", "user": "s1", "username": "alice",
        "message": "hi", "ts": 1700,
    }


@pytest.mark.parametrize("text", ['"id":"9-9"', 'a"b\\c', "é👋", "\n"])
def test_message_id_of_reads_the_id_back(text: str) -> None:
    """message_id_of reads the id of a message frame, whatever its text holds."""
    frame = message_frame("1700-2", message_tail("r", "s1", "alice", text, 1700))
    assert message_id_of(frame) == "1700-2"
    assert fields(frame)["message"] == text


@pytest.mark.parametrize("payload", [
    protocol.presence("r", "join", {"sub": "s1", "username": "alice"}),
    protocol.joined("r", "e"),
    protocol.ack("c1", "1-0"),
    protocol.direct("uuid-1", "s1", "alice", "s2", "hi", 1),
    b"",
    protocol.MESSAGE_PREFIX,
    protocol.MESSAGE_PREFIX + b"1-0",
], ids=["presence", "joined", "ack", "direct", "empty", "bare-prefix", "unterminated"])
def test_message_id_of_non_message_is_none(payload: bytes) -> None:
    """Any payload that is not a whole message frame has no message id."""
    assert message_id_of(payload) is None


def test_parse_id_orders_numerically() -> None:
    """Ids compare as two integers: 9-0 before 10-0, though not as strings."""
    assert "9-0" > "10-0"
    assert parse_id("9-0") < parse_id("10-0")
    ids = ["10-0", "9-1", "9-0", "100-0", "9-10"]
    assert sorted(ids, key=parse_id) == ["9-0", "9-1", "9-10", "10-0", "100-0"]


def test_parse_id_without_seq() -> None:
    """An id without a sequence part reads as sequence 0."""
    assert parse_id("1700") == (1700, 0)


@pytest.mark.parametrize("value", ["0-0", "1700000000000-0", f"{MAX_ID}-{MAX_ID}"])
def test_is_message_id_accepts_stream_ids(value: str) -> None:
    """`<ms>-<seq>` with ASCII digits up to 2^64-1 is a message id."""
    assert is_message_id(value)


@pytest.mark.parametrize("value", [*BAD_SINCE.values(), None, 1.5, b"1-0"])
def test_is_message_id_refuses_anything_else(value: object) -> None:
    """Anything else, a non-string included, is not a message id."""
    assert not is_message_id(value)


# ------------------------------------------------------------------ text frames


def unframe(frame: bytes) -> tuple[int, bool, int, bytes]:
    """(first byte, masked, header length, payload) of one RFC 6455 frame."""
    first, second = frame[0], frame[1]
    length, header = second & 0x7F, 2
    if length == 126:
        (length,), header = struct.unpack("!H", frame[2:4]), 4
    elif length == 127:
        (length,), header = struct.unpack("!Q", frame[2:10]), 10
    assert len(frame) == header + length, "the frame is exactly header + payload"
    return first, bool(second & 0x80), header, frame[header:]


@pytest.mark.parametrize(("size", "header"), [
    (0, 2), (1, 2), (125, 2), (126, 4), (65535, 4), (65536, 10), (70_000, 10),
])
def test_text_frame_is_rfc6455(size: int, header: int) -> None:
    """A final, unmasked text frame with the shortest length encoding for its size."""
    payload = bytes(i % 251 for i in range(size))
    first, masked, header_length, body = unframe(text_frame(payload))
    assert first == 0x81  # FIN, no RSV bits, opcode 1 (text)
    assert not masked
    assert header_length == header
    assert body == payload


def test_text_frame_64_bit_length_has_top_bit_clear() -> None:
    """The 64-bit length's most significant bit is 0, as RFC 6455 5.2 requires."""
    assert text_frame(b"x" * 65536)[2] & 0x80 == 0


# ----------------------------------------------------------------------- closes

TERMINAL = {1000, 1008, 1009}
RETRY = {1001, 1011, 1013, 4001}


@pytest.mark.parametrize("close", CLOSES, ids=lambda c: f"{c.code}-{c.reason}")
def test_close_code_and_reason_fit_rfc6455(close: Close) -> None:
    """Every close has a code in 1000-4999 and a non-empty reason under 123 bytes."""
    assert 1000 <= close.code <= 4999
    assert close.reason
    assert len(close.reason.encode()) < 123


@pytest.mark.parametrize("close", CLOSES, ids=lambda c: f"{c.code}-{c.reason}")
def test_close_retry_follows_its_code(close: Close) -> None:
    """1000/1008/1009 are terminal; 1001/1011/1013/4001 are retried, as PROTOCOL.md says."""
    assert close.code in TERMINAL | RETRY
    assert close.retry is (close.code in RETRY)


def test_closes_lists_every_named_close() -> None:
    """Every Close defined in the module is in CLOSES, so the checks above see it."""
    named = {value for value in vars(protocol).values() if isinstance(value, Close)}
    assert named == set(CLOSES)


@pytest.mark.parametrize("close", CLOSES, ids=lambda c: f"{c.code}-{c.reason}")
def test_because_keeps_code_and_retry(close: Close) -> None:
    """because() adds a detail to the reason and keeps code and retry."""
    detail = close.because("expired")
    assert (detail.code, detail.retry) == (close.code, close.retry)
    assert detail.reason.startswith(close.reason) and detail.reason.endswith("expired")

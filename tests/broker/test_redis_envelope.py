"""The per-user envelope on Redis shard channels: length-prefixed, so unforgeable."""

from __future__ import annotations

import pytest

from chatserver.broker.redis.users import envelope, open_envelope, user_shard


def test_envelope_round_trips() -> None:
    """An envelope opens to the sub and payload it was made of, byte for byte."""
    for sub, payload in [("sub-a", b"!signout"), ("u", b""), ("s", b"\x05sub-a\n" * 3)]:
        assert open_envelope(envelope(sub, payload)) == (sub, payload)


def test_a_crafted_sub_cannot_name_another_user() -> None:
    """A sub holding a separator and a payload still opens as that whole sub."""
    crafted = "sub-alice\n!signout"
    assert open_envelope(envelope(crafted, b"hi")) == (crafted, b"hi")
    assert open_envelope(envelope("sub-bob", b"\x09sub-alice!signout")) == (
        "sub-bob", b"\x09sub-alice!signout")


def test_envelope_is_length_prefixed() -> None:
    """One byte of len(sub), the sub, the payload."""
    assert envelope("abc", b"xyz") == b"\x03abcxyz"


def test_malformed_envelopes_are_refused() -> None:
    """Empty, truncated or non-UTF-8 data is not an envelope."""
    assert open_envelope(b"") is None
    assert open_envelope(b"\x09short") is None
    assert open_envelope(b"\x02\xff\xfe") is None


def test_a_sub_too_long_for_one_byte_is_an_error() -> None:
    """A sub over 255 bytes cannot be framed (protocol.SUB allows 128)."""
    with pytest.raises(ValueError):
        envelope("x" * 256, b"")


def test_user_shard_is_stable() -> None:
    """The shard is crc32 % 256: the same on every process and replica."""
    assert user_shard("x") == 131
    assert all(0 <= user_shard(f"u{i}") < 256 for i in range(1000))

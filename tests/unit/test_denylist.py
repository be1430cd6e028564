"""The denylist's per-worker mirror and its memory backend: pure, no Redis."""

from __future__ import annotations

import pytest

from chatserver.auth.denylist import (
    JTI,
    KEEP_NOT_BEFORE,
    NOT_BEFORE,
    PRUNE_EVERY,
    MemoryDenylist,
    Mirror,
    encode,
)
from chatserver.auth.tokens import User


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def user(jti: str = "j1", sub: str = "s1", iat: float = 999_000.0) -> User:
    return User(sub=sub, username="u", exp=iat + 3600, iat=iat, jti=jti)


async def test_revoked_jti_is_refused_and_others_are_not() -> None:
    """A revoked jti is refused; another token of the same user is not."""
    denylist = MemoryDenylist(Clock())
    await denylist.revoke("j1", 1_003_600.0)
    assert denylist.refuses(user("j1"))
    assert not denylist.refuses(user("j2"))


async def test_not_before_refuses_tokens_issued_at_or_before_it() -> None:
    """revoke_before(sub, t): iat <= t refused, iat > t accepted, other users untouched."""
    denylist = MemoryDenylist(Clock())
    await denylist.revoke_before("s1", 999_500.0)
    assert denylist.refuses(user(iat=999_500.0))
    assert denylist.refuses(user(iat=999_499.0))
    assert not denylist.refuses(user(iat=999_500.001))
    assert not denylist.refuses(user(sub="s2", iat=999_000.0))


async def test_not_before_only_moves_forward() -> None:
    """An older "not before" arriving late never undoes a newer one."""
    denylist = MemoryDenylist(Clock())
    await denylist.revoke_before("s1", 999_500.0)
    await denylist.revoke_before("s1", 999_100.0)
    assert denylist.refuses(user(iat=999_400.0))


def test_tokens_without_jti_are_not_refused_by_an_empty_jti() -> None:
    """A token with no jti never matches a denylisted id."""
    mirror = Mirror(Clock())
    mirror.add(JTI, "j1", 1_003_600.0)
    assert not mirror.refuses(user(jti=""))


def test_broadcast_round_trip() -> None:
    """encode() then apply() on another worker's mirror gives the same refusals."""
    mirror = Mirror(Clock())
    mirror.apply(encode(JTI, "abc def", 1_003_600.0))
    mirror.apply(encode(NOT_BEFORE, "s9", 999_500.0))
    assert mirror.refuses(user(jti="abc def", sub="s2"))
    assert mirror.refuses(user(jti="x", sub="s9", iat=999_000.0))


@pytest.mark.parametrize("payload", [b"", b"x 1.0 k", b"j notanumber k", b"j 1.0", b"n 1.0 "])
def test_malformed_broadcast_is_dropped(payload: bytes) -> None:
    """A broadcast that cannot be read changes nothing and raises nothing."""
    mirror = Mirror(Clock())
    mirror.apply(payload)
    assert len(mirror) == 0


def test_expired_entries_are_pruned() -> None:
    """Past PRUNE_EVERY entries, expired jtis and old "not before" times are swept."""
    clock = Clock()
    mirror = Mirror(clock)
    mirror.add(NOT_BEFORE, "old", clock.now - KEEP_NOT_BEFORE - 1)
    for n in range(PRUNE_EVERY):
        mirror.add(JTI, f"gone{n}", clock.now - 1)  # already expired
    mirror.add(JTI, "live", clock.now + 60)
    assert len(mirror) == 1
    assert mirror.refuses(user(jti="live"))

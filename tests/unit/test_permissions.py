"""Room rules, no process: the syntax, every audience, first match, the closed default."""

from __future__ import annotations

from pathlib import Path

import pytest

from chatserver.auth.tokens import User
from chatserver.config import ConfigError, load_settings
from chatserver.memberships import MemoryMemberships
from chatserver.permissions import Gatekeeper, RoomRules, load_rules, parse_rules

ALICE = User(sub="alice", username="alice")
STAFF = User(sub="sam", username="sam", groups=("staff",))
RULES = ("announce-* read=open write=group:staff; team-* read=members write=members; "
         "support-* read=group:support,members write=group:support; vault read=none")


async def access(rules: RoomRules, room: str, user: User, role: str | None = None
                 ) -> tuple[bool, bool]:
    memberships = MemoryMemberships()
    if role is not None:
        await memberships.grant(room, user.sub, role)
    got = await Gatekeeper(rules, memberships).access(room, user)
    return got.read, got.write


async def test_no_rules_leave_every_room_open() -> None:
    """Without rules, today's behaviour: anyone signed in reads and writes anywhere."""
    assert await access(parse_rules("", "X"), "anything", ALICE) == (True, True)


@pytest.mark.parametrize(
    ("room", "user", "role", "expected"),
    [
        ("announce-1", ALICE, None, (True, False)),  # read open, write staff only
        ("announce-1", STAFF, None, (True, True)),
        ("team-a", ALICE, None, (False, False)),  # members only
        ("team-a", ALICE, "read", (True, False)),
        ("team-a", ALICE, "write", (True, True)),
        ("support-7", User(sub="s", username="s", groups=("support",)), None, (True, True)),
        ("support-7", ALICE, "write", (True, False)),  # a member may read; writing is support's
        ("vault", STAFF, None, (False, False)),
        ("elsewhere", STAFF, None, (False, False)),  # matches no rule: closed by default
        ("lobby", ALICE, None, (True, True)),  # the lobby stays open unless a rule says so
    ],
)
async def test_each_audience_decides_read_and_write(
    room: str, user: User, role: str | None, expected: tuple[bool, bool]
) -> None:
    """open, group:, members (with its read/write role), none, and no rule at all."""
    assert await access(parse_rules(RULES, "X"), room, user, role) == expected


async def test_the_first_matching_rule_wins() -> None:
    """A narrower rule before a broader one decides for the rooms it matches."""
    rules = parse_rules("team-ops read=group:staff write=group:staff; team-* read=open", "X")
    assert await access(rules, "team-ops", ALICE) == (False, False)
    assert await access(rules, "team-dev", ALICE) == (True, False)


async def test_a_rule_can_close_the_lobby() -> None:
    """A rule that matches the lobby replaces its open default."""
    assert await access(parse_rules("lobby read=group:staff", "X"), "lobby", ALICE) == (
        False, False)


@pytest.mark.parametrize(
    "text",
    ["team-* read=everyone", "team-* reed=open", "team-*", "bad/room read=open",
     "team-* read=group:", "team-* read=open write=group:has space"],
)
def test_a_bad_rule_names_itself(text: str) -> None:
    """Each malformed rule raises ConfigError quoting the rule."""
    with pytest.raises(ConfigError, match=r"bad rule"):
        parse_rules(text, "CHAT_ROOM_RULES")


def test_a_bad_rule_stops_start_up() -> None:
    """load_settings refuses a bad CHAT_ROOM_RULES, naming the variable."""
    with pytest.raises(ConfigError, match="CHAT_ROOM_RULES"):
        load_settings({"CHAT_ROOM_RULES": "x read=sometimes"}, env_file=None)


def test_rules_file_is_read_with_comments(tmp_path: Path) -> None:
    """CHAT_ROOM_RULES_FILE: one rule a line, # comments, blank lines."""
    path = tmp_path / "rules"
    path.write_text("# announcements\nannounce-* read=open write=group:staff\n\nteam-* read=members\n")
    rules = load_rules(None, str(path))
    assert [r.pattern for r in rules.rules] == ["announce-*", "team-*"]
    with pytest.raises(ConfigError, match="not both"):
        load_rules("x read=open", str(path))
    with pytest.raises(ConfigError, match="CHAT_ROOM_RULES_FILE"):
        load_rules(None, str(tmp_path / "missing"))


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("svc:0123456789abcdef", ("svc", "0123456789abcdef", "*")),
     ("svc:0123456789abcdef:team-*", ("svc", "0123456789abcdef", "team-*"))],
)
def test_api_keys_may_be_scoped_to_a_room_glob(raw: str, expected: tuple[str, str, str]) -> None:
    """name:key keys reach every room; name:key:glob only matching rooms."""
    assert load_settings({"CHAT_API_KEYS": raw}, env_file=None).api_keys == (expected,)

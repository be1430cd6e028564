"""Room rules: who may read (join, resume, history, members, presence) and who may write
(publish, the publish API) in which rooms. Declared in CHAT_ROOM_RULES or a rules file;
the first rule whose pattern matches a room decides; once any rule exists, a room that
matches none is refused. Pure: the membership lookup is handed in.

A rule is `<pattern> read=<who> write=<who>`, rules separated by `;` (or lines, in a
file). `<who>` is a comma list of `open` (any signed-in user), `group:<name>` (the
token's cognito:groups has it), `members` (granted through the membership API; for
write, a member whose role is write) or `none`. Patterns are globs (`team-*`, `dm.?`).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .auth.tokens import User
from .config_parsers import ConfigError
from .protocol import LOBBY

if TYPE_CHECKING:
    from .memberships import Memberships

READ, WRITE = "read", "write"  # membership roles
GROUP_NAME = re.compile(r"[\w+=,.@-]{1,128}")  # Cognito's group name characters
PATTERN = re.compile(r"[A-Za-z0-9_.*?\[\]!-]{1,64}")


@dataclass(frozen=True, slots=True)
class Audience:
    """Who a rule lets in: anyone signed in, some groups, the granted members."""

    anyone: bool = False
    groups: frozenset[str] = frozenset()
    members: bool = False

    def admits(self, user: User, role: str | None, needed: str) -> bool:
        if self.anyone or not self.groups.isdisjoint(user.groups):
            return True
        return self.members and role is not None and (needed == READ or role == WRITE)


@dataclass(frozen=True, slots=True)
class Rule:
    pattern: str
    read: Audience
    write: Audience

    @property
    def needs_membership(self) -> bool:
        return self.read.members or self.write.members


OPEN = Audience(anyone=True)
LOBBY_RULE = Rule(LOBBY, OPEN, OPEN)  # the lobby stays open unless a rule says otherwise
ALL_OPEN = Rule("*", OPEN, OPEN)  # no rules configured: today's open behaviour


@dataclass(frozen=True, slots=True)
class Access:
    """What one user may do in one room, decided at join."""

    read: bool
    write: bool


class RoomRules:
    def __init__(self, rules: Iterable[Rule]) -> None:
        self.rules = tuple(rules)

    @property
    def closed_by_default(self) -> bool:
        return bool(self.rules)

    def rule_for(self, room: str) -> Rule | None:
        """The first rule that matches; with no rules at all, every room is open."""
        if not self.rules:
            return ALL_OPEN
        for rule in self.rules:
            if fnmatch.fnmatchcase(room, rule.pattern):
                return rule
        return LOBBY_RULE if room == LOBBY else None



def parse_rules(text: str, source: str) -> RoomRules:
    """Rules from `;`- or line-separated text; a bad one raises ConfigError naming it."""
    rules = []
    for raw in re.split(r"[;\n]", text):
        line = raw.split("#", 1)[0].strip()
        if line:
            rules.append(_rule(line, source))
    return RoomRules(rules)


def load_rules(inline: str | None, path: str | None) -> RoomRules:
    if inline and path:
        raise ConfigError("set CHAT_ROOM_RULES or CHAT_ROOM_RULES_FILE, not both")
    if path:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"CHAT_ROOM_RULES_FILE={path!r}: {exc.strerror}") from None
        return parse_rules(text, "CHAT_ROOM_RULES_FILE")
    return parse_rules(inline or "", "CHAT_ROOM_RULES")


def _rule(line: str, source: str) -> Rule:
    pattern, *parts = line.split()
    fields = dict(part.partition("=")[::2] for part in parts)
    if not PATTERN.fullmatch(pattern) or set(fields) - {READ, WRITE} or not fields:
        raise ConfigError(f"{source}: bad rule {line!r}: expected '<glob> read=<who> write=<who>'")
    read = _audience(fields.get(READ, "none"), line, source)
    write = _audience(fields.get(WRITE, "none"), line, source)
    return Rule(pattern, read, write)


def _audience(text: str, line: str, source: str) -> Audience:
    anyone, members, groups = False, False, set()
    for who in text.split(","):
        if who == "open":
            anyone = True
        elif who == "members":
            members = True
        elif who.startswith("group:") and GROUP_NAME.fullmatch(who[6:]):
            groups.add(who[6:])
        elif who != "none":
            raise ConfigError(
                f"{source}: bad rule {line!r}: {who!r} is not open, members, none or group:<name>"
            )
    return Audience(anyone, frozenset(groups), members)


class Gatekeeper:
    """Decides, at join and at a membership change, never per message."""

    def __init__(self, rules: RoomRules, memberships: Memberships) -> None:
        self.rules = rules
        self.memberships = memberships

    async def access(self, room: str, user: User) -> Access:
        rule = self.rules.rule_for(room)
        if rule is None:
            return Access(False, False)
        role = await self.memberships.role(room, user.sub) if rule.needs_membership else None
        read = rule.read.admits(user, role, READ)
        return Access(read, read and rule.write.admits(user, role, WRITE))

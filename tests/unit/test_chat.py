"""ChatService with a real Hub and the memory broker, no process: what a connection can
do (join, leave, publish, resume, members, direct, sign-out) and the limits on it."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from chatserver import protocol
from chatserver.broker.memory import MemoryBroker
from chatserver.chat import ChatService, Limits
from chatserver.connection import Connection
from chatserver.hub import Hub
from chatserver.memberships import MemoryMemberships
from chatserver.permissions import Gatekeeper, parse_rules
from tests.unit.fakes import make_conn, payloads, sent


class Chat:
    """A ChatService on a started memory broker, and the connections it was given."""

    def __init__(self, *, history: int = 1000, presence_limit: int = 100,
                 max_rooms: int = 50, flood_strikes: int = 3, user_rate: float = 0,
                 user_burst: int = 1, rules: str = "", user_rooms_per_hour: int = 0,
                 rooms_per_hour: int = 0) -> None:
        self.broker = MemoryBroker(history_maxlen=history, presence_event_limit=presence_limit)
        self.hub = Hub(position=self.broker.position)
        limits = Limits(max_rooms=max_rooms, max_text_chars=100, flood_strikes=flood_strikes,
                        user_rate=user_rate, user_burst=user_burst,
                        user_rooms_per_hour=user_rooms_per_hour, rooms_per_hour=rooms_per_hour)
        self.memberships = MemoryMemberships()
        gate = Gatekeeper(parse_rules(rules, "CHAT_ROOM_RULES"), self.memberships)
        self.service = ChatService(self.hub, self.broker, limits, gate)
        self.kicked: list[Connection] = []

    async def connect(self, name: str, *, since: str | None = None, epoch: str | None = None,
                      **conn: Any) -> Connection:
        client = make_conn(name, self.kicked, **conn)
        await self.service.connect(client, "t:1", since, epoch)
        await settle()
        return client

    async def send(self, client: Connection, **frame: Any) -> list[dict[str, Any]]:
        """Handle one client frame, let the loop pass end, return what client got."""
        await self.service.handle_text(client, json.dumps(frame))
        await settle()
        return sent(client)


def joined(frames: list[dict[str, Any]], room: str) -> bool:
    return any(f["type"] == "joined" and f["room"] == room for f in frames)


def recovered(frames: list[dict[str, Any]]) -> dict[str, Any]:
    return next(f for f in frames if f["type"] == "recovered")


async def settle() -> None:
    """Let the loop passes run in which the Hub writes what was delivered."""
    for _ in range(3):
        await asyncio.sleep(0)


@pytest.fixture
async def chat() -> Chat:
    made = Chat()
    await made.broker.start(made.service)
    return made


async def test_connect_greets_and_joins_the_lobby_in_one_write(chat: Chat) -> None:
    """welcome then joined(lobby, epoch), written together; the user is registered."""
    alice = await chat.connect("alice")
    first_write = alice.transport.writes[0]  # type: ignore[attr-defined]
    welcome, joined = (json.loads(p) for p in payloads(first_write))
    assert welcome["type"] == "welcome" and joined == {
        "type": "joined", "room": "lobby", "epoch": await chat.broker.epoch("lobby")}
    assert chat.hub.user_connections("alice") == 1 and alice.rooms == {"lobby"}


async def test_presence_join_and_leave_reach_the_room_once_per_user(chat: Chat) -> None:
    """A user's first connection announces a join, a second says nothing, the last leaving
    announces the leave."""
    alice = await chat.connect("alice")
    sent(alice)
    bob1 = await chat.connect("bob")
    await settle()
    assert [f["event"] for f in sent(alice) if f["type"] == "presence"] == ["join"]
    bob2 = await chat.connect("bob")
    await chat.service.disconnect(bob1)
    await settle()
    assert [f for f in sent(alice) if f["type"] == "presence"] == []
    await chat.service.disconnect(bob2)
    await settle()
    leave = [f for f in sent(alice) if f["type"] == "presence"]
    assert leave == [{"type": "presence", "room": "lobby", "event": "leave",
                      "user": {"sub": "bob", "username": "bob"}}]


async def test_publish_acks_with_the_id_every_member_gets() -> None:
    """A publish with a ref is acked with the stored id; each member gets the message."""
    chat = Chat()
    await chat.broker.start(chat.service)
    alice, bob = await chat.connect("alice"), await chat.connect("bob")
    sent(bob)
    got = await chat.send(alice, type="publish", room="lobby", message="hi", ref="r1")
    ack = next(f for f in got if f["type"] == "ack")
    message = next(f for f in got if f["type"] == "message")
    assert ack == {"type": "ack", "ref": "r1", "id": message["id"]}
    assert message["user"] == "alice" and message["message"] == "hi"
    assert [f["id"] for f in sent(bob) if f["type"] == "message"] == [message["id"]]


async def test_publish_to_a_room_not_joined_is_forbidden_with_ref(chat: Chat) -> None:
    """Publishing outside one's rooms answers forbidden, naming the room and the ref."""
    alice = await chat.connect("alice")
    sent(alice)
    got = await chat.send(alice, type="publish", room="elsewhere", message="x", ref="r2")
    assert got == [{"type": "error", "code": "forbidden", "detail": "join 'elsewhere' first",
                    "ref": "r2", "room": "elsewhere"}]


async def test_join_leave_and_their_errors_carry_ref(chat: Chat) -> None:
    """join answers joined, a second join and a leave of an unjoined room say why, with
    the ref; leave answers left."""
    alice = await chat.connect("alice")
    sent(alice)
    assert (await chat.send(alice, type="join", room="r", ref="j1"))[0]["type"] == "joined"
    again = await chat.send(alice, type="join", room="r", ref="j2")
    assert again[0]["code"] == "bad_request" and again[0]["ref"] == "j2"
    assert await chat.send(alice, type="leave", room="r", ref="l1") == [
        {"type": "left", "room": "r"}]
    missing = await chat.send(alice, type="leave", room="r", ref="l2")
    assert missing[0]["code"] == "bad_request" and missing[0]["ref"] == "l2"
    assert "r" not in chat.hub.rooms  # the last member left: the room is dropped here


async def test_resume_replays_exactly_what_was_missed(chat: Chat) -> None:
    """A join with since and the epoch gets every later message, then recovered(complete)."""
    alice = await chat.connect("alice")
    await chat.send(alice, type="join", room="r")
    ids = []
    for n in range(3):
        got = await chat.send(alice, type="publish", room="r", message=f"m{n}", ref=f"p{n}")
        ids.append(next(f["id"] for f in got if f["type"] == "ack"))
    epoch = await chat.broker.epoch("r")
    bob = await chat.connect("bob")
    sent(bob)
    got = await chat.send(bob, type="join", room="r", since=ids[0], epoch=epoch)
    assert [f["id"] for f in got if f["type"] == "message"] == ids[1:]
    assert recovered(got) == {"type": "recovered", "room": "r", "complete": True, "epoch": epoch}
    live = await chat.send(alice, type="publish", room="r", message="live")
    live_id = next(f["id"] for f in live if f["type"] == "message")
    assert [f["id"] for f in sent(bob) if f["type"] == "message"] == [live_id]


async def test_resume_with_another_epoch_replays_all_kept_as_incomplete(chat: Chat) -> None:
    """A stale epoch: everything the room keeps, and complete false."""
    alice = await chat.connect("alice")
    await chat.send(alice, type="join", room="r")
    await chat.send(alice, type="publish", room="r", message="one")
    bob = await chat.connect("bob")
    sent(bob)
    got = await chat.send(bob, type="join", room="r", since="1-0", epoch="stale")
    assert [f["message"] for f in got if f["type"] == "message"] == ["one"]
    assert recovered(got)["complete"] is False


async def test_resume_past_trimmed_history_is_incomplete() -> None:
    """When history no longer reaches since, the replay says complete false."""
    chat = Chat(history=10)
    await chat.broker.start(chat.service)
    alice = await chat.connect("alice")
    first = None
    for n in range(15):
        got = await chat.send(alice, type="publish", message=f"m{n}", ref="p")
        first = first or next(f["id"] for f in got if f["type"] == "ack")
    assert first is not None
    epoch = await chat.broker.epoch("lobby")
    bob = await chat.connect("bob", since=first, epoch=epoch)
    frames = sent(bob)
    assert frames[0]["type"] == "welcome"
    assert len([f for f in frames if f["type"] == "message"]) == 10
    assert recovered(frames)["complete"] is False


async def test_members_lists_the_room_sorted_and_needs_membership(chat: Chat) -> None:
    """members answers every member by username; outside the room it is forbidden."""
    alice = await chat.connect("alice")
    await chat.connect("carol")
    await chat.connect("bob")
    sent(alice)
    got = await chat.send(alice, type="members", room="lobby", ref="m1")
    assert [m["username"] for m in got[-1]["members"]] == ["alice", "bob", "carol"]
    refused = await chat.send(alice, type="members", room="other", ref="m2")
    assert refused[0]["code"] == "forbidden" and refused[0]["ref"] == "m2"


async def test_direct_reaches_the_user_and_the_senders_other_tabs(chat: Chat) -> None:
    """A direct message goes to every connection of the recipient and of the sender."""
    alice1, alice2, bob = [await chat.connect(n) for n in ("alice", "alice", "bob")]
    for conn in (alice2, bob):
        sent(conn)
    got = await chat.send(alice1, type="direct", to="bob", message="psst", ref="d1")
    assert {"type": "ack", "ref": "d1", "id": None} in got
    for conn in (alice1, alice2, bob):
        frames = [f for f in (got if conn is alice1 else sent(conn)) if f["type"] == "direct"]
        assert [(f["from"], f["to"], f["message"]) for f in frames] == [("alice", "bob", "psst")]


async def test_room_limit_refuses_one_more_join() -> None:
    """At max_rooms, a further join is forbidden and the connection stays usable."""
    chat = Chat(max_rooms=2)
    await chat.broker.start(chat.service)
    alice = await chat.connect("alice")
    sent(alice)
    assert (await chat.send(alice, type="join", room="a"))[0]["type"] == "joined"
    refused = await chat.send(alice, type="join", room="b", ref="j")
    assert refused[0]["code"] == "forbidden" and refused[0]["room"] == "b"
    assert alice.rooms == {"lobby", "a"} and not chat.kicked


async def test_new_rooms_are_capped_per_user_and_for_everyone() -> None:
    """Hardening 4: past the hourly allowance a join of a room nobody here is in answers
    rate_limited with the room (connection kept); the lobby and rooms open on the worker
    cost nothing; the deployment-wide allowance holds across users."""
    chat = Chat(user_rooms_per_hour=2, rooms_per_hour=3)
    await chat.broker.start(chat.service)
    alice, bob = await chat.connect("alice"), await chat.connect("bob")
    for room in ("a1", "a2"):
        assert joined(await chat.send(alice, type="join", room=room), room)
    refused = await chat.send(alice, type="join", room="a3", ref="j")
    assert (refused[0]["code"], refused[0]["room"], refused[0]["ref"]) == (
        "rate_limited", "a3", "j")
    assert joined(await chat.send(bob, type="join", room="a1"), "a1")
    assert joined(await chat.send(bob, type="join", room="b1"), "b1")
    everyone = await chat.send(bob, type="join", room="b2")
    assert everyone[0]["code"] == "rate_limited"
    assert alice.rooms == {"lobby", "a1", "a2"} and not chat.kicked


async def test_a_since_past_the_rooms_last_message_replays_it_whole(chat: Chat) -> None:
    """Hardening (low): a since the room never gave is no reason to wait for it: the
    client gets what the room keeps, marked incomplete, then live messages."""
    alice = await chat.connect("alice")
    await chat.send(alice, type="join", room="r")
    await chat.send(alice, type="publish", room="r", message="kept")
    epoch = await chat.broker.epoch("r")
    bob = await chat.connect("bob")
    sent(bob)
    got = await chat.send(bob, type="join", room="r", since="99999999999999-0", epoch=epoch)
    assert [f["message"] for f in got if f["type"] == "message"] == ["kept"]
    assert recovered(got)["complete"] is False
    await chat.send(alice, type="publish", room="r", message="live")
    assert [f["message"] for f in sent(bob) if f["type"] == "message"] == ["live"]


async def test_flooding_is_refused_then_closed_1008(chat: Chat) -> None:
    """Past the bucket, frames get rate_limited; past flood_strikes in a row, close 1008."""
    alice = await chat.connect("alice", rate=0.001, burst=1)
    sent(alice)
    await chat.send(alice, message="one")
    codes = [(await chat.send(alice, message="x"))[0]["code"] for _ in range(2)]
    assert codes == ["rate_limited"] * 2 and not chat.kicked
    refused = await chat.send(alice, type="publish", room="lobby", message="x", ref="p9")
    assert (refused[0]["code"], refused[0]["ref"], refused[0]["room"]) == (
        "rate_limited", "p9", "lobby"), "the refusal names the publish it refuses"
    await chat.send(alice, message="x")
    assert chat.kicked == [alice] and alice.close == protocol.FLOODING


async def test_sign_out_closes_every_connection_of_the_user(chat: Chat) -> None:
    """sign_out kicks each of the user's connections with 1000, and no one else."""
    alice1, alice2, bob = [await chat.connect(n) for n in ("alice", "alice", "bob")]
    await chat.service.sign_out("alice")
    assert set(chat.kicked) == {alice1, alice2} and bob not in chat.kicked
    assert alice1.close == protocol.SIGNED_OUT


async def test_presence_limit_silences_big_rooms() -> None:
    """Over the presence event limit, joins and leaves send no presence frame."""
    chat = Chat(presence_limit=1)
    await chat.broker.start(chat.service)
    alice = await chat.connect("alice")
    sent(alice)
    bob = await chat.connect("bob")
    await chat.service.disconnect(bob)
    await settle()
    assert [f for f in sent(alice) if f["type"] == "presence"] == []


async def test_bad_frame_answers_bad_request_and_keeps_the_connection(chat: Chat) -> None:
    """A frame the parser refuses answers an error frame; nothing is closed."""
    alice = await chat.connect("alice")
    sent(alice)
    await chat.service.handle_text(alice, "{not json")
    assert sent(alice)[0]["code"] == "bad_request" and not chat.kicked


async def test_a_users_connections_share_one_rate_limit() -> None:
    """Many connections of one user do not multiply the user's message rate."""
    chat = Chat(user_rate=0.001, user_burst=2)
    await chat.broker.start(chat.service)
    tabs = [await chat.connect("alice") for _ in range(3)]
    bob = await chat.connect("bob")
    replies = [await chat.send(tab, message="hi", ref="p") for tab in tabs]
    assert [next(f["type"] for f in r if f["type"] in ("ack", "error")) for r in replies] == [
        "ack", "ack", "error"]
    assert any(f.get("code") == "rate_limited" for f in replies[2])
    assert any(f["type"] == "ack" for f in await chat.send(bob, message="hi", ref="b"))


PRIVATE = "team-* read=members write=members; news read=open write=group:staff"


async def private_chat() -> Chat:
    chat = Chat(rules=PRIVATE)
    await chat.broker.start(chat.service)
    return chat


async def test_a_private_room_admits_members_only_and_leaks_nothing() -> None:
    """A member joins; a non-member's join of that room and of an unused one get the
    same forbidden answer; a join with since=0 returns no message."""
    chat = await private_chat()
    await chat.memberships.grant("team-a", "alice", "write")
    alice, eve = await chat.connect("alice"), await chat.connect("eve")
    sent(alice)
    assert (await chat.send(alice, type="join", room="team-a"))[0]["type"] == "joined"
    await chat.send(alice, type="publish", room="team-a", message="secret plans")
    sent(eve)
    used = await chat.send(eve, type="join", room="team-a", since="0-0", ref="x")
    unused = await chat.send(eve, type="join", room="team-zzz", ref="x")
    assert [f for f in used if f["type"] == "message"] == []
    assert used == [dict(unused[0], room="team-a")]
    assert used[0]["code"] == "forbidden" and eve.rooms == {"lobby"}


async def test_a_read_only_room_refuses_publishes_but_delivers() -> None:
    """news: everyone reads, only staff writes; a reader's publish is forbidden."""
    chat = await private_chat()
    reader = await chat.connect("reader")
    await chat.send(reader, type="join", room="news")
    refused = await chat.send(reader, type="publish", room="news", message="x", ref="p")
    assert refused[0]["code"] == "forbidden" and refused[0]["ref"] == "p"


async def test_revoking_a_membership_removes_the_room_at_once() -> None:
    """After revoke, the member's sockets get left(revoked), no more of the room, and a
    resume of it is refused."""
    chat = await private_chat()
    await chat.memberships.grant("team-a", "bob", "write")
    await chat.memberships.grant("team-a", "alice", "write")
    bob, alice = await chat.connect("bob"), await chat.connect("alice")
    for conn in (bob, alice):
        await chat.send(conn, type="join", room="team-a")
    got = await chat.send(alice, type="publish", room="team-a", message="before", ref="p")
    last = next(f["id"] for f in got if f["type"] == "ack")
    epoch = await chat.broker.epoch("team-a")
    sent(bob)
    assert await chat.service.revoke("team-a", "bob") is True
    await settle()
    assert {"type": "left", "room": "team-a", "reason": "revoked"} in sent(bob)
    await chat.send(alice, type="publish", room="team-a", message="after")
    assert [f for f in sent(bob) if f["type"] == "message"] == []
    again = await chat.send(bob, type="join", room="team-a", since=last, epoch=epoch)
    assert again[0]["code"] == "forbidden" and "team-a" not in bob.rooms


async def test_a_grant_takes_effect_at_the_next_join_and_a_downgrade_at_once() -> None:
    """Granted write: the join works; downgraded to read: publishes are refused at once."""
    chat = await private_chat()
    carol = await chat.connect("carol")
    await chat.service.grant("team-b", "carol", "write")
    await chat.send(carol, type="join", room="team-b")
    await chat.service.grant("team-b", "carol", "read")
    await settle()
    refused = await chat.send(carol, type="publish", room="team-b", message="x")
    assert refused[0]["code"] == "forbidden"


async def test_a_closed_lobby_greets_without_joining_it() -> None:
    """When the rules close the lobby, the welcome lists no room and nothing is joined."""
    chat = Chat(rules="lobby read=group:staff; team-* read=open")
    await chat.broker.start(chat.service)
    dana = await chat.connect("dana")
    frames = sent(dana)
    assert frames[0]["type"] == "welcome" and frames[0]["rooms"] == [] and dana.rooms == set()

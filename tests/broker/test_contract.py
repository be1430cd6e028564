"""The Broker contract, driven through the seam itself with a recording sink: every
backend in conftest.BACKENDS passes the same assertions."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from chatserver import protocol
from chatserver.broker.base import Broker, BrokerUnavailable, Member
from chatserver.broker.memory import MemoryBroker
from chatserver.broker.redis import user_shard
from chatserver.protocol import message_frame, message_id_of, parse_id

from .conftest import WAIT, Backend, Outage, RecordingSink, Started

MakeBroker = Callable[..., Awaitable[Started]]

ALICE = Member("sub-alice", "alice")
BOB = Member("sub-bob", "bob")
CAROL = Member("sub-carol", "carol")


def tail(room: str, n: int) -> bytes:
    return protocol.message_tail(room, "sub-alice", "alice", f"message {n}", 1_700_000_000_000)


async def publish(broker: Broker, room: str, count: int, start: int = 0) -> list[str]:
    """Publish `count` messages in one loop pass; their ids, in order."""
    futures = [broker.publish(room, tail(room, n)) for n in range(start, start + count)]
    async with asyncio.timeout(WAIT):
        return list(await asyncio.gather(*futures))


async def settle(broker: Broker, sink: RecordingSink, room: str) -> str:
    """Publish a marker and wait for it: whatever the broker did for the room before
    (subscription, presence) has reached the sink by then."""
    (marker,) = await publish(broker, room, 1, start=-1)
    await sink.until(lambda: marker in sink.ids(room))
    return marker


def same_shard_subs(count: int) -> list[str]:
    """Subs that share one user shard, so a backend that shards users must tell them apart."""
    subs = [f"user-{i}" for i in range(2000)]
    shard = user_shard(subs[0])
    return [sub for sub in subs if user_shard(sub) == shard][:count]


# ------------------------------------------------------------------ rooms


async def test_publish_resolves_in_order_with_increasing_ids(make_broker: MakeBroker) -> None:
    """Publishes resolve in the order made, ids increase, the sink gets the frames in order."""
    broker, sink = await make_broker()
    await broker.subscribe_room("r")
    ids = await publish(broker, "r", 300)  # more than one pipeline batch
    assert [parse_id(i) for i in ids] == sorted({parse_id(i) for i in ids})
    await sink.until(lambda: len(sink.payloads("r")) == 300)
    assert sink.payloads("r") == [message_frame(i, tail("r", n)) for n, i in enumerate(ids)]
    assert broker.position("r") == parse_id(ids[-1])


async def test_subscribe_starts_after_what_the_room_holds(make_broker: MakeBroker) -> None:
    """A new subscription delivers only messages published after it; position starts there."""
    broker, sink = await make_broker()
    assert broker.position("r") is None
    earlier = await publish(broker, "r", 3)
    await broker.subscribe_room("r")
    assert broker.position("r") == parse_id(earlier[-1])
    later = await publish(broker, "r", 2, start=3)
    await sink.until(lambda: len(sink.payloads("r")) >= 2)
    assert sink.ids("r") == later


async def test_empty_room_position_is_zero(make_broker: MakeBroker) -> None:
    """A subscribed room with no history has position (0, 0); an unsubscribed one None."""
    broker, _ = await make_broker()
    await broker.subscribe_room("r")
    assert broker.position("r") == (0, 0)
    assert broker.position("other") is None


async def test_unsubscribed_room_gets_nothing(make_broker: MakeBroker) -> None:
    """Nothing is delivered for a room never subscribed or unsubscribed; position is None."""
    broker, sink = await make_broker()
    await broker.subscribe_room("a")
    await broker.subscribe_room("b")
    await settle(broker, sink, "b")
    await broker.unsubscribe_room("a")
    assert broker.position("a") is None
    await publish(broker, "a", 2)
    await publish(broker, "never", 2)
    await settle(broker, sink, "b")  # published after: had a or never arrived, it would be here
    assert {room for room, _ in sink.rooms} == {"b"}


async def test_publish_event_reaches_subscribers_unstored(make_broker: MakeBroker) -> None:
    """publish_event reaches the room's subscribers in order and is not in history."""
    broker, sink = await make_broker()
    await broker.subscribe_room("r")
    await settle(broker, sink, "r")
    await broker.publish_event("r", b'{"type":"custom"}')
    await sink.until(lambda: b'{"type":"custom"}' in sink.payloads("r"))
    replay = await broker.history("r", "0-0", await broker.epoch("r"))
    assert b'{"type":"custom"}' not in replay.frames


# ---------------------------------------------------------------- history


async def test_history_replays_after_since(make_broker: MakeBroker) -> None:
    """history() returns the frames after `since`, complete, with the room's epoch."""
    broker, _ = await make_broker()
    epoch = await broker.epoch("r")
    ids = await publish(broker, "r", 5)
    replay = await broker.history("r", ids[1], epoch)
    assert replay.frames == [message_frame(i, tail("r", n)) for n, i in enumerate(ids)][2:]
    assert replay.complete and replay.epoch == epoch
    assert await broker.epoch("r") == epoch
    caught_up = await broker.history("r", ids[-1], epoch)
    assert caught_up.frames == [] and caught_up.complete


async def test_epoch_change_replays_everything_kept(make_broker: MakeBroker) -> None:
    """A stale epoch gets every kept message, complete:false, and the current epoch."""
    broker, _ = await make_broker()
    ids = await publish(broker, "r", 5)
    replay = await broker.history("r", ids[2], "stale-epoch")
    assert [message_id_of(f) for f in replay.frames] == ids
    assert not replay.complete
    assert replay.epoch == await broker.epoch("r") != "stale-epoch"


async def test_trimmed_history_is_incomplete(make_broker: MakeBroker) -> None:
    """When trimming passed `since` the replay is incomplete, at most maxlen, and ends at
    the room's last message."""
    broker, _ = await make_broker(history_maxlen=10)
    epoch = await broker.epoch("r")
    ids = await publish(broker, "r", 300)
    replay = await broker.history("r", ids[0], epoch)
    got = [message_id_of(f) for f in replay.frames]
    assert not replay.complete
    assert got == ids[-10:]
    recent = await broker.history("r", ids[-3], epoch)
    assert [message_id_of(f) for f in recent.frames] == ids[-2:] and recent.complete


async def test_a_since_past_the_last_message_is_replayed_whole_incomplete(
        make_broker: MakeBroker) -> None:
    """A since the room never gave (the future, or a lost stream) gets what is kept, and
    complete:false; an empty room gives nothing, also incomplete."""
    broker, _ = await make_broker()
    epoch = await broker.epoch("r")
    ids = await publish(broker, "r", 3)
    replay = await broker.history("r", "99999999999999-0", epoch)
    assert [message_id_of(f) for f in replay.frames] == ids
    assert not replay.complete and replay.epoch == epoch
    empty_epoch = await broker.epoch("empty")
    empty = await broker.history("empty", "5-0", empty_epoch)
    assert empty.frames == [] and not empty.complete


async def test_room_state_expires_once_unused_for_the_room_ttl(make_broker: MakeBroker) -> None:
    """Hardening 4: history and epoch of a room nobody uses go after room_ttl; a room in
    use keeps them (every publish and history read pushes the expiry out)."""
    broker, _ = await make_broker(room_ttl=2)
    idle_epoch, used_epoch = await broker.epoch("idle"), await broker.epoch("used")
    (idle_id,) = await publish(broker, "idle", 1)
    (used_id,) = await publish(broker, "used", 1)
    for _ in range(3):  # 3 x 0.9 s: past the TTL of "idle", never idle for "used"
        await asyncio.sleep(0.9)
        await broker.history("used", used_id, used_epoch)
    await broker.epoch("another")  # a room made: when the memory broker sweeps
    gone = await broker.history("idle", idle_id, idle_epoch)
    assert gone.frames == [] and not gone.complete and gone.epoch != idle_epoch
    kept = await broker.history("used", "0-0", used_epoch)
    assert [message_id_of(f) for f in kept.frames] == [used_id] and kept.complete


async def test_an_empty_room_nobody_is_in_leaves_no_state_behind() -> None:
    """The memory broker keeps no room that has no member and no message."""
    broker = MemoryBroker()
    for n in range(100):
        room = f"r{n}"
        await broker.subscribe_room(room)
        await broker.epoch(room)
        await broker.unsubscribe_room(room)
    await broker.subscribe_room("kept")
    await publish(broker, "kept", 1)
    await broker.unsubscribe_room("kept")
    assert list(broker._streams) == ["kept"]


# --------------------------------------------------------------- presence


async def test_presence_events_follow_the_limit(make_broker: MakeBroker) -> None:
    """Join is an event while the room has <= limit after it; leave while it had <= limit
    before; members() is everyone, sorted by username."""
    broker, sink = await make_broker(presence_event_limit=2)
    await broker.subscribe_room("r")
    await settle(broker, sink, "r")

    async def change(member: Member, joined: bool) -> list[tuple[str, str]]:
        broker.presence("r", member, joined)
        await settle(broker, sink, "r")  # presence is in order with publishes
        return [(e["event"], e["user"]["username"]) for e in sink.events("r")]

    assert await change(CAROL, True) == [("join", "carol")]
    assert await change(BOB, True) == [("join", "carol"), ("join", "bob")]
    assert (await change(ALICE, True))[2:] == []  # 3 > limit
    assert await broker.members("r") == [ALICE, BOB, CAROL]
    assert (await change(CAROL, False))[2:] == []  # had 3 > limit
    assert (await change(BOB, False))[2:] == [("leave", "bob")]  # had 2
    assert await broker.members("r") == [ALICE]
    event = sink.events("r")[0]
    assert event == {"type": "presence", "room": "r", "event": "join", "user": CAROL.public()}


async def test_presence_is_a_set(make_broker: MakeBroker) -> None:
    """A second join of a present member is no event; one leave makes them absent."""
    broker, sink = await make_broker()
    await broker.subscribe_room("r")
    await settle(broker, sink, "r")
    broker.presence("r", ALICE, True)
    broker.presence("r", ALICE, True)
    assert await broker.members("r") == [ALICE]  # members() sees changes made before it
    broker.presence("r", ALICE, False)
    assert await broker.members("r") == []
    await settle(broker, sink, "r")
    assert [e["event"] for e in sink.events("r")] == ["join", "leave"]


async def test_members_of_an_empty_room(make_broker: MakeBroker) -> None:
    """members() of a room nobody joined is empty."""
    broker, _ = await make_broker()
    assert await broker.members("nobody") == []


# ------------------------------------------------------------------ users


async def test_send_user_reaches_only_that_user(make_broker: MakeBroker) -> None:
    """send_user reaches the user's subscription only: not another user's (same shard)."""
    broker, sink = await make_broker()
    alice, bob, carol = same_shard_subs(3)
    await broker.subscribe_user(alice)
    await broker.subscribe_user(carol)
    await broker.send_user(bob, b"to bob")
    await broker.send_user(alice, b'{"type":"direct"}')
    await sink.until(lambda: len(sink.users) >= 1)
    await broker.unsubscribe_user(alice)
    await broker.send_user(alice, b"after unsubscribe")
    await broker.send_user(carol, b"to carol")
    await sink.until(lambda: len(sink.users) >= 2)
    assert sink.users == [(alice, b'{"type":"direct"}'), (carol, b"to carol")]


async def test_sign_out_payload_arrives_verbatim(make_broker: MakeBroker) -> None:
    """Per-user payloads (sign-out, anything with newlines) arrive byte for byte."""
    broker, sink = await make_broker()
    await broker.subscribe_user("sub-alice")
    payloads = [b"!signout", b"two\nlines\n", b"", bytes(range(256))]
    for payload in payloads:
        await broker.send_user("sub-alice", payload)
    await sink.until(lambda: len(sink.users) == len(payloads))
    assert sink.users == [("sub-alice", p) for p in payloads]


async def test_no_sub_forges_another_users_envelope(make_broker: MakeBroker) -> None:
    """A crafted sub (or payload) cannot deliver to another user."""
    broker, sink = await make_broker()
    alice = "sub-alice"
    await broker.subscribe_user(alice)
    # Subs whose shard is alice's, framed the way a separator-based envelope would be.
    crafted = [s for i in range(5000) if user_shard(s := f"{alice}\n{i}") == user_shard(alice)]
    for sub in [*crafted[:3], f"{alice}\n", "\x09" + alice]:
        await broker.send_user(sub, b"!signout")
    await broker.send_user(alice, b"marker")
    await sink.until(lambda: len(sink.users) >= 1)
    assert sink.users == [(alice, b"marker")]


# --------------------------------------------------------- across workers


def needs_workers(backend: Backend) -> None:
    if not backend.shared:
        pytest.skip(f"{backend.name}: one worker only")


async def test_workers_share_rooms_users_and_presence(
    backend: Backend, make_broker: MakeBroker
) -> None:
    """Another worker gets the room's messages and the user's traffic; presence counts a
    user once across workers."""
    needs_workers(backend)
    (one, sink_one), (two, sink_two) = await make_broker(), await make_broker()
    await two.subscribe_room("r")
    await two.subscribe_user("sub-alice")
    await settle(one, sink_two, "r")
    ids = await publish(one, "r", 3)
    await one.send_user("sub-alice", b"hello")
    await sink_two.until(lambda: sink_two.users == [("sub-alice", b"hello")])
    await sink_two.until(lambda: sink_two.ids("r")[-3:] == ids)
    # Each worker's changes are in order with its own publishes, not with another's.
    for worker, joined in [(one, True), (two, True), (one, False)]:
        worker.presence("r", ALICE, joined)
        await settle(worker, sink_two, "r")
    assert await two.members("r") == [ALICE]
    two.presence("r", ALICE, False)
    await settle(two, sink_two, "r")
    assert [e["event"] for e in sink_two.events("r")] == ["join", "leave"]
    assert sink_one.rooms == []  # `one` never subscribed


async def test_a_shutting_down_workers_members_are_handed_off_not_left(
    backend: Backend, make_broker: MakeBroker
) -> None:
    """After hand_off, a worker's leaving members stay present: one who joins on another
    worker meanwhile causes no event at all; one who does not is swept with a leave once
    the hand-off ends."""
    needs_workers(backend)
    (old, _), (new, sink) = await make_broker(presence_ttl=3.0), await make_broker(
        presence_ttl=3.0)
    await new.subscribe_room("r")
    await settle(new, sink, "r")
    for member in (ALICE, BOB):
        old.presence("r", member, True)
    await settle(old, sink, "r")
    await sink.until(lambda: len(sink.events("r")) == 2)
    old.hand_off(1.0)
    for member in (ALICE, BOB):
        old.presence("r", member, False)  # the drain closed their sockets
    await settle(old, sink, "r")
    assert await new.members("r") == [ALICE, BOB]  # still present: handed off
    new.presence("r", ALICE, True)  # alice reconnected to the other worker
    await settle(new, sink, "r")
    # bob never came back: the other worker's sweep (every ttl/3) makes him leave.
    await sink.until(lambda: len(sink.events("r")) == 3, timeout=WAIT + 3.0)
    assert [(e["event"], e["user"]["sub"]) for e in sink.events("r")] == [
        ("join", ALICE.sub), ("join", BOB.sub), ("leave", BOB.sub)]
    assert await new.members("r") == [ALICE]


# ----------------------------------------------------------------- outage


async def test_outage_fails_fast_then_replays_the_gap(
    outage: Outage, make_outage_broker: MakeBroker
) -> None:
    """Server killed: calls raise BrokerUnavailable, connected goes False. Back: the broker
    reconnects, resubscribes, replays the gap in order with no duplicate, and the epoch
    says the history was lost."""
    lost = asyncio.Event()
    broker, sink = await make_outage_broker(on_reconnect=lost.set)
    await broker.subscribe_room("r")
    await broker.subscribe_user("sub-alice")
    before = [await settle(broker, sink, "r")]
    epoch = await broker.epoch("r")
    assert broker.connected
    outage.kill()
    async with asyncio.timeout(WAIT):
        await lost.wait()
    assert not broker.connected
    with pytest.raises(BrokerUnavailable):
        await asyncio.wait_for(broker.publish("r", tail("r", 0)), WAIT)
    with pytest.raises(BrokerUnavailable):
        await broker.send_user("sub-alice", b"lost")
    outage.restart()
    gap = await publish(broker, "r", 5)  # stored before the listener is back, most likely
    await sink.until(lambda: len(sink.ids("r")) >= 6)
    assert sink.ids("r") == before + gap
    assert broker.connected  # the listener delivers only once connected
    await broker.send_user("sub-alice", b"back")  # the user shard was resubscribed
    await sink.until(lambda: sink.users == [("sub-alice", b"back")])
    replay = await broker.history("r", before[0], epoch)
    assert not replay.complete and replay.epoch != epoch
    assert [message_id_of(f) for f in replay.frames] == gap

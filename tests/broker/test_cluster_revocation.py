"""The denylist and the challenge store on a real cluster: what a sign-out revokes on one
worker is refused on another, and a pending challenge is taken once."""

from __future__ import annotations

import asyncio
import time

from chatserver.auth.challenge_store import Pending, RedisChallengeStore
from chatserver.auth.denylist import RedisDenylist
from chatserver.auth.tokens import User
from chatserver.broker.redis.client import command_client

from .conftest import WAIT


async def test_a_revocation_on_one_worker_is_refused_by_another_on_a_cluster(
        cluster_url: str) -> None:
    stores = [command_client(cluster_url) for _ in range(2)]
    lists = [RedisDenylist(store, cluster_url, "revoke:") for store in stores]
    try:
        for denylist in lists:
            await denylist.start()
        now = time.time()
        user = User("sub-a", "alice", exp=now + 60, iat=now - 1, jti="jti-1")
        other = User("sub-b", "bob", exp=now + 60, iat=now - 1, jti="jti-2")
        await lists[0].revoke("jti-1", now + 60)
        await lists[0].revoke_before("sub-b", now)
        async with asyncio.timeout(WAIT):  # the mirror has no event: its state is polled
            while not (lists[1].refuses(user) and lists[1].refuses(other)):  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        stores.append(command_client(cluster_url))
        late = RedisDenylist(stores[-1], cluster_url, "revoke:")
        lists.append(late)
        await late.start()  # loaded from the cluster, not heard
        assert late.refuses(user) and late.refuses(other)
    finally:
        for denylist, store in zip(lists, stores, strict=True):
            await denylist.close()
            await store.aclose()


async def test_a_pending_challenge_is_taken_once_on_a_cluster(cluster_url: str) -> None:
    client = command_client(cluster_url)
    store = RedisChallengeStore(client, "challenge:")
    try:
        pending = Pending("SMS_MFA", "session", "alice", "alice", time.time() + 60, ())
        pending_id = await store.put(pending)
        assert await store.take(pending_id) == pending
        assert await store.take(pending_id) is None
    finally:
        await client.aclose()

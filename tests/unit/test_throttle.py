"""The sign-in throttle on the memory counter with a clock of our own."""

from __future__ import annotations

from chatserver.auth.throttle import MAX_WAIT, LoginThrottle
from chatserver.counters import MemoryHitCounter


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


async def test_failures_past_the_limit_impose_a_doubling_wait_capped_at_a_minute() -> None:
    clock = Clock()
    throttle = LoginThrottle(MemoryHitCounter(clock), per_minute=3)
    waits = []
    for _ in range(12):
        await throttle.failed("Alice")
        waits.append(await throttle.wait_before_login(f"10.0.0.{len(waits)}", "alice"))
    assert waits[:2] == [0.0, 0.0]
    assert waits[2:9] == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, MAX_WAIT]
    assert set(waits[9:]) == {MAX_WAIT}
    clock.now += MAX_WAIT
    assert await throttle.wait_before_login("10.0.1.1", "ALICE") == 0.0


async def test_a_good_password_clears_the_failures_and_refusals_do_not_count() -> None:
    clock = Clock()
    throttle = LoginThrottle(MemoryHitCounter(clock), per_minute=3)
    for _ in range(2):
        await throttle.failed("bob")
    await throttle.succeeded("Bob")
    for _ in range(2):
        await throttle.failed("bob")
    assert await throttle.wait_before_login("10.0.0.1", "bob") == 0.0
    # an address past its limit is refused, and that refusal is no failure of the name
    for _ in range(3):
        assert await throttle.wait_before_login("10.0.0.9", "carol") == 0.0
    assert await throttle.wait_before_login("10.0.0.9", "carol") > 0
    assert await throttle.wait_before_login("10.0.0.10", "carol") == 0.0


async def test_calls_that_cost_cognito_are_limited_per_address() -> None:
    throttle = LoginThrottle(MemoryHitCounter(Clock()), per_minute=2)
    waits = [await throttle.wait_before_call("10.0.0.1") for _ in range(7)]
    assert waits[:6] == [0.0] * 6 and waits[6] > 0
    assert await throttle.wait_before_call("10.0.0.2") == 0.0

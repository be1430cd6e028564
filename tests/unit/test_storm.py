"""The storm scenario's pure parts: the reconnect backoff, the books that merge across
shards, the figures and the verdict."""

from __future__ import annotations

import random

import pytest

from chatserver.loadtest.conductor import Outcome
from chatserver.loadtest.member import CAP, TRY_AGAIN_BASE, Member, backoff
from chatserver.loadtest.plan import Plan, PlanError, parse_target
from chatserver.loadtest.stats import Histogram, Tally
from chatserver.loadtest.storm_book import Book
from chatserver.loadtest.storm_report import lag_buckets, lag_diff, storm_figures, storm_verdict

TARGETS = (parse_target("http://127.0.0.1:1"), parse_target("http://127.0.0.1:2"))


def plan(**changes: object) -> Plan:
    fields: dict[str, object] = dict(scenario="storm", targets=TARGETS, clients=10,
                                     run_id="r1", rooms=2, stop_pid=123)
    fields.update(changes)
    return Plan(**fields)  # type: ignore[arg-type]


def test_backoff_is_full_jitter_with_a_floor_after_1013_and_honours_retry_after() -> None:
    random.seed(7)
    first = [backoff(0, 1001, 0.0) for _ in range(200)]
    assert all(0 <= d <= 1.0 for d in first) and max(first) > 0.5  # random(0, 1 s)
    assert all(0 <= backoff(3, None, 0.0) <= 8.0 for _ in range(200))
    assert all(TRY_AGAIN_BASE <= backoff(0, 1013, 0.0) <= 2 * TRY_AGAIN_BASE
               for _ in range(200))
    assert all(backoff(40, None, 0.0) <= CAP for _ in range(200))  # capped, no overflow
    assert all(2.0 <= backoff(0, None, 2.0) <= 3.0 for _ in range(200))  # after Retry-After


def test_books_merge_exactly_through_json() -> None:
    one, two = Book(), Book()
    one.drops["1001"] += 3
    one.resumed_ns += [5, 7]
    one.storm_latency[0] = Histogram()
    one.storm_latency[0].record_ns(2_000_000)
    one.dropped_from[1] += 3
    two.drops["1001"] += 1
    two.drops["None"] += 1
    two.attempts["HTTP 503 on upgrade"] += 4
    two.incomplete = 1
    two.resumed_ns.append(6)
    merged = Book.from_json(one.to_json())
    merged.merge(Book.from_json(two.to_json()))
    assert merged.drops == {"1001": 4, "None": 1}
    assert sorted(merged.resumed_ns) == [5, 6, 7] and merged.incomplete == 1
    assert merged.attempts == {"HTTP 503 on upgrade": 4}
    assert merged.storm_latency[0].count == 1 and merged.dropped_from == {1: 3}


def test_a_member_counts_each_message_once_and_replays_are_not_latency() -> None:
    tally, book = Tally(), Book()
    member = Member(3, "u3", TARGETS, "st-r1-1", 1, "r1", tally, book)
    frame = ('{"type":"message","id":"%s","room":"st-r1-1","user":"s","username":"u",'
             '"message":"LTr1:1:%d:0","ts":1}')
    member.on_text(frame % ("1-0", 0))
    member.on_text(frame % ("1-0", 0))  # the same message again
    assert tally.deliveries == 1 and tally.duplicates == 1 and member.last_id == "1-0"
    member.resuming = True
    member.on_text(frame % ("2-0", 1))
    assert tally.deliveries == 2 and tally.latency.count == 1  # the replayed one is not timed
    member.on_text('{"type":"recovered","room":"st-r1-1","complete":false,"epoch":"e2"}')
    assert book.incomplete == 1 and member.epoch == "e2" and not member.resuming
    assert member.missing([0, 1, 2]) == 1


def test_the_storm_verdict_names_each_shortfall() -> None:
    book = Book()
    book.drops["1001"] = 4
    book.resumed_ns = [1_500_000_000, 2_000_000_000, 2_500_000_000]
    book.attempts.update({"no joined frame within 10 s": 2, "HTTP 503 on upgrade": 5,
                          "resumed": 3})
    book.storm_latency = {0: Histogram(), 1: Histogram()}
    book.storm_latency[0].record_ns(400_000_000)  # from a survivor's publisher
    book.storm_latency[1].record_ns(900_000_000)  # from the stopped one's: not the survivors'
    book.dropped_from[1] = 4
    storm = {"book": book, "kill_ns": 1_000_000_000, "stopped_ns": 2_000_000_000,
             "calm_ns": 3_000_000_000, "unresumed": 1, "server_lag": [None, None]}
    figures = storm_figures(plan(), Outcome(Tally(), 1.0, 0, 1.0, storm=storm))
    assert figures["resumed_99pct_s"] is None and figures["resumed_100pct_s"] is None
    assert figures["shed"] == 5 and figures["timed_out"] == 2
    assert figures["survivor_latency_ms"]["max"] == 400.0
    assert figures["storm_latency_ms"]["max"] == 900.0
    failures = " | ".join(storm_verdict(figures))
    assert "1 of 4 dropped clients" in failures
    assert "2 reconnects timed out" in failures
    assert "400.0 ms, over the --latency-budget of 250 ms" in failures


@pytest.mark.parametrize(("changes", "says"), [
    ({"stop_pid": None}, "--stop-pid PID or --stop-cmd"),
    ({"stop_cmd": "true"}, "--stop-pid PID or --stop-cmd"),
    ({"targets": TARGETS[:1]}, "two or more --url"),
    ({"rooms": 11}, "--rooms 11 is more than --clients 10"),
    ({"rate": 0.0}, "--rate 0.0"),
])
def test_storm_plans_that_cannot_run_are_refused(changes: dict[str, object], says: str) -> None:
    with pytest.raises(PlanError, match=says.replace("-", r"\-").replace(".", r"\.")):
        plan(**changes).check()


def test_rooms_and_their_publishers() -> None:
    storm = plan()
    assert [storm.room_of(i) for i in range(4)] == ["st-r1-0", "st-r1-1"] * 2


def test_a_servers_loop_lag_in_the_storm_is_the_difference_of_two_scrapes() -> None:
    def scrape(counts: list[int]) -> str:
        bounds = ["0.005", "0.01", "0.1", "+Inf"]
        lines = [f'chatserver_loop_lag_seconds_bucket{{le="{b}"}} {float(n)}'
                 for b, n in zip(bounds, counts, strict=True)]
        return "\n".join(["# HELP chatserver_loop_lag_seconds ...", *lines,
                          "chatserver_loop_lag_seconds_count 9.0"])

    before = lag_buckets(scrape([100, 100, 100, 100]))
    assert before == {0.005: 100, 0.01: 100, 0.1: 100, float("inf"): 100}
    after = lag_buckets(scrape([150, 190, 199, 200]))  # 100 samples more in the storm
    assert lag_diff(before, after) == {"samples": 100, "p50_under_s": 0.005,
                                       "p99_under_s": 0.1}
    assert lag_diff(before, None) is None and lag_diff(before, before) is None

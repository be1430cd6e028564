"""The storm's figures and verdict: how fast the dropped clients were back, what the
survivors' latency did meanwhile, how the server shed the load, and that nothing was lost
or repeated.
"""

from __future__ import annotations

import math
from typing import Any

from .conductor import Outcome
from .plan import Plan
from .stats import Histogram
from .storm_book import Book

LAG_METRIC = "chatserver_loop_lag_seconds_bucket"
SHED = ("HTTP 503", "HTTP 429", "closed before joining: 1013")
TIMED_OUT = "no joined frame"


def storm_figures(plan: Plan, outcome: Outcome) -> dict[str, Any]:
    storm = outcome.storm
    assert storm is not None
    book: Book = storm["book"]
    kill_ns = storm["kill_ns"]
    dropped = sum(book.drops.values())
    resumes = sorted((ns - kill_ns) / 1e9 for ns in book.resumed_ns)
    drops = [(ns - kill_ns) / 1e9 for ns in book.dropped_ns]
    attempts = dict(book.attempts)
    gone = storm["stopped_ns"]
    survivors, everyone = Histogram(), Histogram()
    for url, histogram in book.storm_latency.items():
        everyone.merge(histogram)
        if not book.dropped_from[url]:  # a server that dropped nobody: a survivor
            survivors.merge(histogram)
    return {
        "stopped": f"pid {plan.stop_pid}" if plan.stop_pid is not None else plan.stop_cmd,
        "server_gone_s": None if gone is None else round((gone - kill_ns) / 1e9, 3),
        "storm_s": round((storm["calm_ns"] - kill_ns) / 1e9, 3),
        "dropped": dropped,
        "drops_by_close_code": dict(book.drops),
        "drops_s": [round(min(drops), 3), round(max(drops), 3)] if drops else None,
        "resumed": len(resumes),
        "unresumed": storm["unresumed"],
        "resumed_50pct_s": _rank(resumes, dropped, 50),
        "resumed_99pct_s": _rank(resumes, dropped, 99),
        "resumed_100pct_s": _rank(resumes, dropped, 100),
        "incomplete_resumes": book.incomplete,
        "reconnect_attempts": attempts,
        "shed": sum(n for why, n in attempts.items() if why.startswith(SHED)),
        "timed_out": sum(n for why, n in attempts.items() if why.startswith(TIMED_OUT)),
        "survivor_latency_ms": survivors.summary_ms(),
        "server_loop_lag": dict(zip([t.base for t in plan.targets], storm["server_lag"],
                                    strict=True)),
        "client_lag_ms": book.client_lag.summary_ms(),
        "storm_latency_ms": everyone.summary_ms(),
        "latency_budget_ms": plan.latency_budget,
        "skipped_publishes": book.skipped,
        "presence_events": book.presence_events,
        "connect_shed": book.connect_shed,
    }


def lag_buckets(metrics: str) -> dict[float, int]:
    """chatserver_loop_lag_seconds_bucket lines of a /metrics text: {bound: count}."""
    buckets: dict[float, int] = {}
    for line in metrics.splitlines():
        if line.startswith(LAG_METRIC + '{le="'):
            bound, _, count = line[len(LAG_METRIC) + 5:].partition('"} ')
            buckets[float(bound)] = int(float(count))
    return buckets


def lag_diff(before: dict[float, int] | None,
             after: dict[float, int] | None) -> dict[str, Any] | None:
    """What a server's loop-lag histogram gained between two scrapes: its samples, and the
    bucket bounds under which 50 % and 99 % of them fell (seconds; inf: past the last)."""
    if not before or not after:
        return None
    gained = {bound: after.get(bound, 0) - n for bound, n in before.items()}
    total = gained.get(math.inf, 0)
    if total <= 0:
        return None

    def under(q: int) -> float:
        return min(b for b, n in gained.items() if n >= math.ceil(q / 100 * total))

    return {"samples": total, "p50_under_s": under(50), "p99_under_s": under(99)}


def storm_verdict(figures: dict[str, Any]) -> list[str]:
    failures = []
    if not figures["dropped"]:
        failures.append("no client lost its socket: is the server stopped one of the --url "
                        "list, with clients on it?")
    if figures["unresumed"]:
        failures.append(f"{figures['unresumed']} of {figures['dropped']} dropped clients had "
                        "not resumed when --resume-timeout ended")
    if figures["incomplete_resumes"]:
        failures.append(f"{figures['incomplete_resumes']} resumes were incomplete: the server "
                        "could not replay the gap")
    if figures["timed_out"]:
        failures.append(f"{figures['timed_out']} reconnects timed out instead of being shed "
                        "with a retry hint")
    p99 = figures["survivor_latency_ms"]["p99"]
    if p99 is not None and p99 > figures["latency_budget_ms"]:
        failures.append(f"the survivors' p99 latency in the storm was {p99} ms, over the "
                        f"--latency-budget of {figures['latency_budget_ms']:g} ms")
    return failures


def storm_rows(result: dict[str, Any]) -> list[tuple[str, str]]:
    storm = result["storm"]
    latency = storm["survivor_latency_ms"]
    return [
        ("first connects shed", f"{storm['connect_shed']} (503 + Retry-After, retried)"),
        ("stopped", f"{storm['stopped']}, gone after {storm['server_gone_s']} s"),
        ("dropped", f"{storm['dropped']} {storm['drops_by_close_code']}, from "
                    f"{_span(storm['drops_s'])} s after the stop"),
        ("resumed", f"{storm['resumed']}/{storm['dropped']}: 50 % in "
                    f"{storm['resumed_50pct_s']} s, 99 % in "
                    f"{storm['resumed_99pct_s']} s, 100 % in {storm['resumed_100pct_s']} s "
                    f"(incomplete {storm['incomplete_resumes']})"),
        ("reconnects", f"{storm['reconnect_attempts']} (shed {storm['shed']}, "
                       f"timed out {storm['timed_out']})"),
        ("presence frames", f"{storm['presence_events']} in the storm"),
        ("survivors in storm",
         f"p50 {latency['p50']}  p99 {latency['p99']}  max {latency['max']} ms "
         f"(n={latency['count']}, budget {storm['latency_budget_ms']:g}; messages among "
         "the clients of the servers that stayed)"),
        ("server loop lag", "; ".join(
            f"{url}: {_lag(lag)}" for url, lag in storm["server_loop_lag"].items())),
        ("generator lag", f"p99 {storm['client_lag_ms']['p99']} max "
                          f"{storm['client_lag_ms']['max']} ms (this tool's own loop: "
                          "latencies include it)"),
        ("all in storm", f"p99 {storm['storm_latency_ms']['p99']} ms (with the stopped "
                         "server's publishers' last messages)"),
    ]


def _lag(lag: dict[str, Any] | None) -> str:
    if lag is None:
        return "-"
    return (f"50 % under {lag['p50_under_s']} s, 99 % under {lag['p99_under_s']} s "
            f"(n={lag['samples']})")


def _span(seconds: list[float] | None) -> str:
    return "-" if seconds is None else f"{seconds[0]} to {seconds[1]}"


def _rank(sorted_seconds: list[float], total: int, q: int) -> float | None:
    """Seconds until q % of `total` had resumed; None if that many never did."""
    needed = max(1, math.ceil(q / 100 * total))
    if len(sorted_seconds) < needed:
        return None
    return round(sorted_seconds[needed - 1], 3)

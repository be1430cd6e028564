"""From the merged tally to the figures: the JSON object, the table, and the verdict.

A run passes when every client connected and every message the server accepted reached
every live client exactly once, with no refusal and no socket closed by the server.
"""

from __future__ import annotations

from typing import Any

from .conductor import Outcome
from .plan import Plan
from .storm_report import storm_figures, storm_rows, storm_verdict

RATE_ADVICE = ("the server limits each socket to CHAT_RATE messages/s (default 10, burst 20): "
               "start it with CHAT_RATE=0, or pace with --publish-rate / a lower --rate")


def summarize(plan: Plan, outcome: Outcome) -> dict[str, Any]:
    tally = outcome.tally
    result: dict[str, Any] = {
        "scenario": plan.scenario,
        "ok": True,
        "failures": [],
        "urls": [t.base for t in plan.targets],
        "clients": plan.clients,
        "procs": plan.procs,
        "auth": "private-key" if plan.private_key_pem else "dev-login",
        "run_id": plan.run_id,
        "seconds": round(outcome.seconds, 3),
        "connect": {
            "attempted": tally.attempted,
            "connected": tally.connected,
            "failures": tally.attempted - tally.connected,
            "failure_reasons": dict(tally.connect_failures),
            "seconds": round(outcome.connect_seconds, 3),
            "per_second": _rate(tally.connected, outcome.connect_seconds),
            "latency_ms": tally.connect.summary_ms(),
        },
        "closed_by_server": dict(tally.closes),
        "error_frames": dict(tally.errors),
    }
    if plan.scenario != "connect":
        expected = outcome.accepted * tally.connected  # every live client, each message
        # Deliveries of unconfirmed messages can offset losses: then this is a floor.
        lost = max(0, expected - tally.deliveries)
        if outcome.storm is not None:  # each member owes what its own room stored
            expected, lost = outcome.storm["expected"], outcome.storm["lost"]
        window = (tally.last_receive_ns - tally.first_send_ns) / 1e9 if tally.deliveries else 0.0
        result.update({
            "sent": tally.sent,
            "refused": tally.refused,
            "unconfirmed": tally.unconfirmed,
            "rate_limited": tally.errors.get("rate_limited", 0),
            "accepted": outcome.accepted,
            "receivers": tally.connected,
            "expected": expected,
            "deliveries": tally.deliveries,
            "lost": lost,
            "duplicates": tally.duplicates,
            "deliveries_per_second": _rate(tally.deliveries, window),
            "latency_ms": tally.latency.summary_ms(),
        })
        if plan.scenario == "fanout":
            result.update(messages=plan.messages, inflight=plan.inflight,
                          publish_rate=plan.publish_rate or None)
        elif plan.scenario == "storm":
            result.update(rooms=plan.rooms, rate=plan.rate, storm=storm_figures(plan, outcome))
        else:
            result.update(rate=plan.rate, duration=plan.duration,
                          sent_per_second=_rate(tally.sent, plan.duration))
    result["failures"] = verdict(plan, result)
    result["ok"] = not result["failures"]
    return result


def verdict(plan: Plan, result: dict[str, Any]) -> list[str]:
    """One line per way the run fell short, with what to change where we know it."""
    failures = []
    connect = result["connect"]
    if connect["failures"]:
        reasons = ", ".join(f"{n} x {why}" for why, n in connect["failure_reasons"].items())
        failures.append(f"{connect['failures']} of {connect['attempted']} clients did not "
                        f"connect ({reasons})")
    if result["closed_by_server"]:
        codes = ", ".join(f"{n} x {code}" for code, n in result["closed_by_server"].items())
        failures.append(f"the server closed sockets during the run ({codes})")
    if plan.scenario == "connect":
        return failures
    if result["rate_limited"]:
        failures.append(f"{result['rate_limited']} messages refused as rate_limited: "
                        + RATE_ADVICE)
    elif result["refused"]:
        failures.append(f"{result['refused']} messages refused ({result['error_frames']})")
    if plan.scenario == "storm":
        failures += storm_verdict(result["storm"])
    elif result["unconfirmed"]:
        failures.append(f"{result['unconfirmed']} messages unconfirmed: their sender was "
                        "closed before they came back, so `lost` is a lower bound")
    if result["lost"] > 0:
        failures.append(f"{result['lost']} of {result['expected']} deliveries lost "
                        f"(waited {plan.grace:g} s after the last send; see --grace)")
    if result["duplicates"]:
        failures.append(f"{result['duplicates']} duplicate deliveries")
    return failures


def table(result: dict[str, Any]) -> str:
    connect = result["connect"]
    rows = [
        ("scenario", f"{result['scenario']} ({result['clients']} clients, {result['procs']} "
                     f"procs, {result['auth']}, {len(result['urls'])} URL(s))"),
        ("connected", f"{connect['connected']}/{connect['attempted']} in {connect['seconds']} s "
                      f"= {connect['per_second']} conn/s"),
        ("connect failures", str(connect["failures"])),
        ("connect latency ms", _latency(connect["latency_ms"])),
    ]
    if result["scenario"] == "storm":
        rows += storm_rows(result)
    if result["scenario"] != "connect":
        rows += [
            ("sent", f"{result['sent']} (refused {result['refused']}, rate_limited "
                     f"{result['rate_limited']}, unconfirmed {result['unconfirmed']})"),
            ("deliveries", f"{result['deliveries']}/{result['expected']} = "
                           f"{result['deliveries_per_second']}/s"),
            ("lost", str(result["lost"])),
            ("duplicates", str(result["duplicates"])),
            ("latency ms", _latency(result["latency_ms"])),
        ]
    if result["closed_by_server"]:
        rows.append(("closed by server", str(result["closed_by_server"])))
    rows.append(("result", "PASS" if result["ok"] else "FAIL"))
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label.ljust(width)}  {value}" for label, value in rows)


def _latency(summary: dict[str, Any]) -> str:
    if not summary["count"]:
        return "no samples"
    return (f"p50 {summary['p50']}  p99 {summary['p99']}  max {summary['max']}  "
            f"mean {summary['mean']}  (n={summary['count']})")


def _rate(count: int, seconds: float) -> float:
    return round(count / seconds, 1) if seconds > 0 else 0.0

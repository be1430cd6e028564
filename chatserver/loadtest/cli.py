"""The `chatserver-loadtest` command: options to a Plan, run it, print a table or JSON.

Exit status: 0 the run passed; 1 it failed or could not run (one line on stderr says
why); 2 the options are wrong.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import sys
from pathlib import Path

from ..auth.dev import DevIssuer
from . import runner
from .plan import Plan, PlanError, RunError, parse_target
from .progress import Progress
from .report import summarize, table
from .worker import loop_factory

PROG = "chatserver-loadtest"
DEFAULT_URL = "http://127.0.0.1:3020"
NOTES = """\
sign-in: by default each client signs in with POST /auth/login, which the server limits to
CHAT_LOGIN_RATE (default 10) a minute per IP and per username; start the server with
CHAT_LOGIN_RATE above --clients, or pass --private-key with the PEM the server was started
with (CHAT_DEV_KEY_FILE) to mint tokens locally instead.

rate limit: the server allows CHAT_RATE messages/s per socket (default 10, burst 20) and
answers more with rate_limited error frames (counted apart, and the run fails). For fanout
start the server with CHAT_RATE=0, or pace the publisher with --publish-rate 10.

clocks: latency is send to receipt on this machine's monotonic clock, shared by --procs.
"""


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", action="append", dest="urls", metavar="URL",
                        help=f"server base URL, repeat for several (default {DEFAULT_URL}); "
                             "clients are spread round-robin")
    common.add_argument("--origin", help="Origin header (default: each URL's own origin)")
    common.add_argument("--clients", type=int, default=100, help="simulated users (default 100)")
    common.add_argument("--concurrency", type=int, default=100,
                        help="sign-ins and connects under way at once (default 100)")
    common.add_argument("--procs", type=int, default=1,
                        help="processes to spread the clients over (default 1)")
    auth = common.add_mutually_exclusive_group()
    auth.add_argument("--private-key", type=Path, metavar="PEM",
                      help="mint tokens with the server's dev key (its CHAT_DEV_KEY_FILE)")
    auth.add_argument("--dev-login", action="store_true",
                      help="sign in with POST /auth/login (the default)")
    common.add_argument("--password", default="", help="dev sign-in password (CHAT_DEV_PASSWORD)")
    common.add_argument("--connect-timeout", type=float, default=10.0,
                        help="seconds for one sign-in or socket to open (default 10)")
    common.add_argument("--grace", type=float, default=5.0,
                        help="seconds to wait for late messages before counting them lost (5)")
    common.add_argument("--deadline", type=float, default=300.0,
                        help="hard limit for the whole run in seconds (default 300)")
    common.add_argument("--json", action="store_true", help="one JSON object on stdout")
    common.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress line on stderr (default: when stderr is a terminal)")

    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog=PROG, description="Load test a chatserver deployment.",
                                     epilog=NOTES, formatter_class=raw)
    scenarios = parser.add_subparsers(dest="scenario", required=True, metavar="SCENARIO")

    def scenario(name: str, summary: str) -> argparse.ArgumentParser:
        return scenarios.add_parser(name, parents=[common], help=summary, description=summary,
                                    epilog=NOTES, formatter_class=raw)

    connect = scenario("connect", "open N sockets: conn/s, failures, connect latency")
    connect.add_argument("--hold", type=float, default=0.0,
                         help="seconds to keep the sockets open before closing (default 0)")
    fanout = scenario("fanout", "N subscribers, 1 publisher: deliveries/s, latency, loss")
    fanout.add_argument("--messages", type=int, default=1000, help="messages to publish (1000)")
    fanout.add_argument("--inflight", type=int, default=50,
                        help="most messages sent but not yet echoed to the publisher (50)")
    fanout.add_argument("--publish-rate", type=float, default=0.0,
                        help="publisher messages/s (default 0: as fast as --inflight allows)")
    fanout.add_argument("--size", type=int, default=0, help="pad message texts to this length")
    chat = scenario("chat", "N clients each sending --rate messages/s: latency, loss")
    chat.add_argument("--rate", type=float, default=1.0, help="messages/s per client (1)")
    chat.add_argument("--duration", type=float, default=10.0, help="seconds of sending (10)")
    chat.add_argument("--size", type=int, default=0, help="pad message texts to this length")
    storm = scenario("storm", "clients in rooms on several URLs; one server is stopped and its "
                              "clients reconnect and resume: time to resume, loss, latency")
    storm.add_argument("--rooms", type=int, default=20, help="rooms, one publisher each (20)")
    storm.add_argument("--rate", type=float, default=1.0, help="messages/s per room (1)")
    storm.add_argument("--size", type=int, default=0, help="pad message texts to this length")
    storm.add_argument("--warmup", type=float, default=3.0,
                       help="seconds of traffic before the server is stopped (3)")
    storm.add_argument("--after", type=float, default=2.0,
                       help="seconds of traffic after every dropped client resumed (2)")
    stop = storm.add_mutually_exclusive_group(required=True)
    stop.add_argument("--stop-pid", type=int, metavar="PID",
                      help="the server process to SIGTERM (one of the --url servers)")
    stop.add_argument("--stop-cmd", metavar="CMD",
                      help="shell command that stops one of the --url servers, e.g. "
                           "'docker compose kill -s TERM app-2'")
    storm.add_argument("--resume-timeout", type=float, default=60.0,
                       help="seconds for every dropped client to resume (60)")
    storm.add_argument("--latency-budget", type=float, default=250.0,
                       help="ms the survivors' p99 message latency must stay under (250)")
    return parser


def plan_from(args: argparse.Namespace) -> Plan:
    targets = tuple(parse_target(url, args.origin) for url in (args.urls or [DEFAULT_URL]))
    pem = None
    if args.private_key is not None:
        try:
            pem = args.private_key.read_text()
            DevIssuer(pem.encode())
        except OSError as exc:
            raise PlanError(f"--private-key {args.private_key}: {exc.strerror}") from None
        except ValueError:
            raise PlanError(f"--private-key {args.private_key}: not an RSA private key "
                            "in PEM") from None
    extra = {name: getattr(args, name) for name in
             ("hold", "messages", "inflight", "publish_rate", "rate", "duration", "size",
              "rooms", "warmup", "after", "stop_pid", "stop_cmd", "resume_timeout",
              "latency_budget")
             if hasattr(args, name)}
    return Plan(
        scenario=args.scenario, targets=targets, clients=args.clients,
        run_id=secrets.token_hex(4), procs=args.procs, concurrency=args.concurrency,
        private_key_pem=pem, password=args.password, connect_timeout=args.connect_timeout,
        deadline=args.deadline, grace=args.grace, **extra,
    ).check()


def run(argv: list[str] | None = None) -> int:
    """The whole command; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        plan = plan_from(args)
    except PlanError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    show = sys.stderr.isatty() if args.progress is None else args.progress
    progress = Progress(plan.scenario, 0, enabled=show)
    try:
        with asyncio.Runner(loop_factory=loop_factory()) as loop:
            outcome = loop.run(runner.run(plan, progress))
    except RunError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        if args.json:
            print(json.dumps({"scenario": plan.scenario, "ok": False, "error": str(exc)}))
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    result = summarize(plan, outcome)
    print(json.dumps(result) if args.json else table(result))
    for failure in result["failures"]:
        print(f"{PROG}: FAIL: {failure}", file=sys.stderr)
    return 0 if result["ok"] else 1


def main(argv: list[str] | None = None) -> None:
    sys.exit(run(argv))


if __name__ == "__main__":
    main()

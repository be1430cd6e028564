"""chatserver-loadtest: its pure parts, then the command against real chatserver processes."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from chatserver.auth.dev import new_private_key_pem
from chatserver.loadtest.client import Client
from chatserver.loadtest.plan import Target
from chatserver.loadtest.stats import Histogram, Tally
from tests.support import ROOT, ServerProcess, free_port, scaled

Run = tuple[int, dict[str, Any] | None, str]


def loadtest(*args: str, timeout: float = 40) -> Run:
    """Run the command as a user would; (exit status, its JSON or None, stderr)."""
    proc = subprocess.run(
        [sys.executable, "-m", "chatserver.loadtest.cli", *args, "--json", "--deadline", "30"],
        capture_output=True, text=True, timeout=scaled(timeout), cwd=ROOT,
    )
    result = json.loads(proc.stdout) if proc.stdout.strip() else None
    return proc.returncode, result, proc.stderr


def fast_server(make_server: Callable[..., ServerProcess], dev_key_file: Path,
                **kwargs: Any) -> ServerProcess:
    return make_server(env={"CHAT_RATE": "0", "CHAT_DEV_KEY_FILE": str(dev_key_file)}, **kwargs)


def assert_ordered(latency: dict[str, Any]) -> None:
    assert latency["count"] > 0
    assert 0 <= latency["p50"] <= latency["p99"] <= latency["max"], latency


def assert_complete(result: dict[str, Any], deliveries: int) -> None:
    assert result["ok"], result["failures"]
    assert result["connect"]["failures"] == 0
    assert result["lost"] == 0 and result["duplicates"] == 0
    assert result["deliveries"] == result["expected"] == deliveries
    assert_ordered(result["connect"]["latency_ms"])
    assert_ordered(result["latency_ms"])


# ------------------------------------------------------------------ pure parts


def test_histograms_merge_exactly() -> None:
    """Histograms merged from shards equal one histogram fed every sample."""
    samples = [random.randint(0, 5_000_000_000) for _ in range(5000)]
    whole, left, right = Histogram(), Histogram(), Histogram()
    for n, ns in enumerate(samples):
        whole.record_ns(ns)
        (left if n % 3 else right).record_ns(ns)
    merged = Tally()
    for part in (left, right):
        shard = Tally()
        shard.latency = part
        merged.merge(Tally.from_json(json.loads(json.dumps(shard.to_json()))))
    assert merged.latency.summary_ms() == whole.summary_ms()
    exact_p99 = sorted(samples)[int(0.99 * len(samples)) - 1] // 1000
    assert abs(whole.percentile_us(99) - exact_p99) <= exact_p99 / 128 + 1


def test_reader_fast_path_agrees_with_json() -> None:
    """A message frame counts once, whether found by its prefix or by parsing; repeats are duplicates."""
    tally = Tally()
    client = Client(0, "u", Target("http://h", "ws://h/ws", "http://h"), "run1", tally)
    text = "LTrun1:7:3:1"
    fast = ('{"type":"message","id":"1-0","room":"lobby","user":"s","username":"u",'
            f'"message":"{text}","ts":1}}')
    reordered = json.dumps({"message": text, "type": "message", "id": "1-1"})
    other_run = fast.replace("LTrun1", "LTrun2")
    for frame in (fast, reordered, other_run, '{"type":"presence","room":"lobby"}'):
        client.on_text(frame)
    assert (tally.deliveries, tally.duplicates, client.distinct) == (1, 1, 1)


# ------------------------------------------------------------- against servers


def test_fanout_memory_broker(make_server: Callable[..., ServerProcess], dev_key_file: Path) -> None:
    """fanout on one worker: every subscriber gets every message once, latencies ordered."""
    server = fast_server(make_server, dev_key_file)
    code, result, err = loadtest("fanout", "--url", server.url, "--clients", "20", "--messages",
                                 "50", "--inflight", "10", "--private-key", str(dev_key_file))
    assert code == 0, err
    assert result is not None
    assert_complete(result, 20 * 50)
    assert result["sent"] == 50 and result["rate_limited"] == 0


def test_fanout_redis_two_workers_two_procs(make_server: Callable[..., ServerProcess],
                                            redis_url: str, dev_key_file: Path) -> None:
    """fanout over Redis and 2 workers, from 2 load processes: exact merged totals."""
    server = fast_server(make_server, dev_key_file, workers=2, redis_url=redis_url)
    code, result, err = loadtest("fanout", "--url", server.url, "--url", server.url,
                                 "--clients", "20", "--messages", "50", "--procs", "2",
                                 "--private-key", str(dev_key_file))
    assert code == 0, err
    assert result is not None and result["procs"] == 2
    assert_complete(result, 20 * 50)


def test_chat_every_client_gets_every_message(make_server: Callable[..., ServerProcess],
                                              dev_key_file: Path) -> None:
    """chat: N clients x r msg/s x D s, each message reaches all N clients (its sender too)."""
    server = fast_server(make_server, dev_key_file)
    code, result, err = loadtest("chat", "--url", server.url, "--clients", "10", "--rate", "4",
                                 "--duration", "1", "--private-key", str(dev_key_file))
    assert code == 0, err
    assert result is not None
    assert_complete(result, 10 * 4 * 10)


def test_connect_with_dev_login(make_server: Callable[..., ServerProcess]) -> None:
    """connect signs in through POST /auth/login when the login rate allows it."""
    server = make_server(env={"CHAT_LOGIN_RATE": "100"})
    code, result, err = loadtest("connect", "--url", server.url, "--clients", "30",
                                 "--concurrency", "10", "--dev-login")
    assert code == 0, err
    assert result is not None and result["ok"]
    assert result["connect"]["connected"] == 30 and result["connect"]["failures"] == 0
    assert result["connect"]["per_second"] > 0
    assert_ordered(result["connect"]["latency_ms"])


def test_dev_login_rate_limit_is_explained(make_server: Callable[..., ServerProcess]) -> None:
    """A 429 from the dev sign-in stops the run with advice naming CHAT_LOGIN_RATE."""
    server = make_server()
    code, result, err = loadtest("connect", "--url", server.url, "--clients", "15")
    assert code == 1
    assert result is not None and result["ok"] is False
    assert "429" in err and "CHAT_LOGIN_RATE" in err and "--private-key" in err


def test_rate_limited_frames_are_counted_apart(make_server: Callable[..., ServerProcess],
                                               dev_key_file: Path) -> None:
    """With the default CHAT_RATE the refused publishes are counted, not reported lost."""
    server = make_server(env={"CHAT_DEV_KEY_FILE": str(dev_key_file)})
    code, result, err = loadtest("fanout", "--url", server.url, "--clients", "5", "--messages",
                                 "30", "--inflight", "30", "--private-key", str(dev_key_file))
    assert code == 1 and result is not None
    assert result["rate_limited"] > 0 and result["refused"] == result["rate_limited"]
    assert result["accepted"] == 30 - result["rate_limited"]
    assert result["lost"] == 0 and result["deliveries"] == 5 * result["accepted"]
    assert "CHAT_RATE=0" in err


def test_wrong_url_fails_in_one_line() -> None:
    """A URL nobody listens on exits 1 at once with one line saying so."""
    url = f"http://127.0.0.1:{free_port()}"
    code, result, err = loadtest("fanout", "--url", url, "--clients", "5", timeout=15)
    assert code == 1
    assert err.strip().splitlines() == [f"chatserver-loadtest: cannot reach {url}: Connection refused"]
    assert result is not None and result["ok"] is False


def test_wrong_private_key_is_explained(make_server: Callable[..., ServerProcess],
                                        dev_key_file: Path, tmp_path: Path) -> None:
    """A key the server does not use fails before any client starts, naming CHAT_DEV_KEY_FILE."""
    server = fast_server(make_server, dev_key_file)
    other = tmp_path / "other.pem"
    other.write_bytes(new_private_key_pem())
    code, _, err = loadtest("connect", "--url", server.url, "--clients", "5",
                            "--private-key", str(other), timeout=15)
    assert code == 1
    assert "CHAT_DEV_KEY_FILE" in err and len(err.strip().splitlines()) == 1


def test_storm_every_client_of_a_stopped_instance_resumes_with_nothing_lost(
        make_server: Callable[..., ServerProcess], redis_url: str, dev_key_file: Path) -> None:
    """storm: two instances on one Redis, clients in rooms on both; SIGTERM one: each of its
    clients reconnects to the other and resumes its room, and every member ends holding
    every message its room stored, once."""
    env = {"CHAT_DEV_KEY_FILE": str(dev_key_file)}
    survivor = make_server(redis_url=redis_url, env=env)
    stopped = make_server(redis_url=redis_url, env=env)
    code, result, err = loadtest(
        "storm", "--url", survivor.url, "--url", stopped.url, "--clients", "60", "--rooms", "6",
        "--rate", "4", "--warmup", "1", "--after", "1", "--resume-timeout", "20",
        "--stop-pid", str(stopped.pid), "--private-key", str(dev_key_file), "--procs", "2",
        timeout=60)
    assert code == 0, err
    assert result is not None and result["ok"], result["failures"]
    storm = result["storm"]
    assert stopped.proc is not None and stopped.proc.wait(timeout=scaled(10)) == 0
    assert storm["drops_by_close_code"] == {"1001": 30}  # the clients of the stopped one
    assert storm["resumed"] == 30 and storm["unresumed"] == 0
    assert storm["incomplete_resumes"] == 0 and storm["timed_out"] == 0
    assert 0 < storm["resumed_99pct_s"] <= storm["resumed_100pct_s"]
    assert storm["reconnect_attempts"]["resumed"] == 30
    assert result["lost"] == 0 and result["duplicates"] == 0
    # Every member holds its room's stored messages: 10 members a room, each room stored some.
    assert result["accepted"] > 6 and result["deliveries"] == result["expected"]
    assert result["expected"] == 10 * result["accepted"]
    assert_ordered(storm["survivor_latency_ms"])
    # The stopped instance handed its members off: their reconnects elsewhere made no
    # presence leave or join for the rooms (CHAT_PRESENCE_HANDOFF).
    assert storm["presence_events"] == 0
    # The survivor's own loop lag over the storm, from its /metrics; the stopped one has none.
    lags = storm["server_loop_lag"]
    assert lags[stopped.url] is None and lags[survivor.url]["samples"] > 0


def test_storm_names_what_to_stop() -> None:
    """storm without --stop-pid/--stop-cmd, or with one URL, is a usage error (exit 2)."""
    proc = subprocess.run([sys.executable, "-m", "chatserver.loadtest.cli", "storm"],
                          capture_output=True, text=True, timeout=scaled(15), cwd=ROOT)
    assert proc.returncode == 2 and "--stop-pid" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "chatserver.loadtest.cli", "storm",
                           "--stop-pid", "1", "--url", "http://127.0.0.1:1"],
                          capture_output=True, text=True, timeout=scaled(15), cwd=ROOT)
    assert proc.returncode == 2 and "two or more --url" in proc.stderr

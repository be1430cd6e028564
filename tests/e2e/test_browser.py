"""Browser tests: the static client in Chromium against a real chatserver and Redis.

The server runs with two workers, the dev sign-in and plain-http cookies. Waits are
Playwright's own (expect, wait_for_*), each bounded; a reconnect is held back with
Playwright's fake clock instead of sleeping, so "while A was away" is exact.
"""

from __future__ import annotations

import os
import re
import signal
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, BrowserContext, Page, WebSocket, expect, sync_playwright

from tests.support import ServerProcess, scaled

pytestmark = pytest.mark.e2e

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
TIMEOUT_MS = scaled(10) * 1000
OUTPUT = Path(__file__).resolve().parents[1] / "output"
XSS = "<img src=x onerror=alert(1)>"
A_LONG_TIME_MS = 120_000  # well past the 30 s backoff cap: any scheduled retry would fire
SHORT_TOKEN_TTL = 10  # seconds, the server's minimum CHAT_DEV_TOKEN_TTL

PageFactory = Callable[..., Page]


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """One headless Debian Chromium for the module (never `playwright install`)."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is not installed")
    expect.set_options(timeout=TIMEOUT_MS)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        yield browser
        browser.close()


@pytest.fixture
def chat_server(make_server: Callable[..., ServerProcess], redis_url: str) -> ServerProcess:
    """`chatserver --workers 2` on Redis, dev sign-in, plain-http cookies, static/ at /."""
    return make_server(workers=2, redis_url=redis_url, env={"CHAT_LOGIN_RATE": "1000"})


@pytest.fixture
def chat_url(chat_server: ServerProcess) -> str:
    return chat_server.url


@pytest.fixture
def make_page(browser: Browser, chat_url: str) -> Iterator[PageFactory]:
    """Factory: a page in a fresh context (its own cookies), watched for CSP and dialogs."""
    contexts: list[BrowserContext] = []
    problems: list[str] = []

    def make(*, clock: bool = False, width: int = 1200, height: int = 760) -> Page:
        context = browser.new_context(
            base_url=chat_url, viewport={"width": width, "height": height}, locale="en-US"
        )
        context.set_default_timeout(TIMEOUT_MS)
        contexts.append(context)
        page = context.new_page()
        page.on(
            "dialog",
            lambda dialog: (problems.append(f"dialog: {dialog.message}"), dialog.dismiss()),
        )
        page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
        page.on(
            "console",
            lambda msg: (
                problems.append(f"console: {msg.text}")
                if "Content Security Policy" in msg.text
                else None
            ),
        )
        if clock:
            page.clock.install()
        page.goto("/")
        expect(page.locator("#login-form")).to_be_visible()
        return page

    yield make
    for context in contexts:
        context.close()
    assert problems == [], "the page did something it must not"


# ---------------------------------------------------------------- helpers


def sign_in(page: Page, username: str) -> WebSocket:
    """Sign in through the form; returns the socket once the status line says connected."""
    with page.expect_websocket() as opened:
        page.fill("#username", username)
        page.fill("#password", os.environ.get("CHAT_DEV_PASSWORD", "secret"))
        page.press("#password", "Enter")
    expect(page.locator("#status")).to_have_attribute("data-state", "connected")
    expect(page.locator("#login-form")).to_be_hidden()
    return opened.value


def send(page: Page, text: str) -> None:
    """Type a message, press Enter, and wait for the server's echo in this page."""
    expect(page.locator("#message-input")).to_be_enabled()
    page.fill("#message-input", text)
    page.press("#message-input", "Enter")
    expect(page.locator("#messages .message .text").last).to_have_text(text)


def join(page: Page, room: str) -> None:
    """Join a room through the form and wait until the server confirmed it."""
    page.fill("#room-input", room)
    page.press("#room-input", "Enter")
    expect(page.locator(f"#rooms [data-room='{room}'] .room-select")).to_have_attribute(
        "aria-current", "true"
    )
    expect(page.locator(f"#rooms [data-room='{room}'] .room-pending")).to_have_count(0)


def message_ids(page: Page) -> list[str]:
    return page.locator("#messages .message").evaluate_all(
        "items => items.map(item => item.dataset.id)"
    )


def requests_to(page: Page, path: str) -> list[str]:
    """A list that collects, from now on, the URL of each request the page makes to path."""
    seen: list[str] = []
    page.on(
        "request", lambda request: seen.append(request.url) if request.url.endswith(path) else None
    )
    return seen


def websockets_opened(page: Page) -> list[str]:
    """A list that collects, from now on, the URL of each WebSocket the page opens."""
    seen: list[str] = []
    page.on("websocket", lambda ws: seen.append(ws.url))
    return seen


def pause_clock(page: Page) -> None:
    """Freeze the page's timers (a scheduled reconnect waits until resume/run_for)."""
    now_ms = page.evaluate("Date.now()")
    page.clock.pause_at(now_ms / 1000 + 0.05)


def kill_worker_of(page: Page, server_pid: int) -> str:
    """SIGKILL the worker this page's socket is on; returns its `host:pid` instance."""
    instance = page.locator("#status").get_attribute("data-instance")
    assert instance, "the status line must carry the welcome frame's instance"
    pid = int(instance.rsplit(":", 1)[1])
    assert parent_of(pid) == server_pid, f"{instance} is not a worker of our server"
    os.kill(pid, signal.SIGKILL)
    return instance


def parent_of(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def auth_failures(base_url: str) -> dict[str, float]:
    """`chatserver_auth_failures_total` by reason, from /metrics (summed over workers).

    Fetched without the browser's cookies, so the scrape itself is never a failure.
    """
    with urllib.request.urlopen(f"{base_url}/metrics", timeout=TIMEOUT_MS / 1000) as response:
        text = response.read().decode()
    counts: dict[str, float] = {}
    pattern = re.compile(r'^chatserver_auth_failures_total\{reason="([^"]*)"\} (\S+)$')
    for line in text.splitlines():
        if match := pattern.match(line):
            counts[match[1]] = counts.get(match[1], 0.0) + float(match[2])
    return counts


# ---------------------------------------------------------------- tests


def test_two_users_chat_both_ways_and_markup_stays_text(make_page: PageFactory) -> None:
    """Two signed-in browsers see each other's messages; HTML in a message is shown as text."""
    alice, bob = make_page(), make_page()
    sign_in(alice, "alice")
    sign_in(bob, "bob")
    expect(alice.locator("#presence li")).to_have_count(2)
    expect(alice.locator("#presence")).to_contain_text("bob")

    send(alice, "hello bob")
    expect(bob.locator("#messages .message .text").last).to_have_text("hello bob")
    expect(bob.locator("#messages .message").last.locator(".username")).to_have_text("alice")
    send(bob, XSS)

    last = alice.locator("#messages .message").last
    expect(last.locator(".text")).to_have_text(XSS)
    expect(last.locator(".username")).to_have_text("bob")
    expect(last.locator(".time")).to_have_text(re.compile(r"\d"))
    assert last.locator(".text").evaluate("node => node.textContent") == XSS
    expect(alice.locator("#messages img")).to_have_count(0)
    expect(bob.locator("#messages img")).to_have_count(0)
    assert message_ids(alice) == message_ids(bob)


def test_worker_killed_page_reconnects_and_shows_missed_messages_once(
    make_page: PageFactory, chat_server: ServerProcess
) -> None:
    """A page whose worker is SIGKILLed reconnects and shows each message it missed, once."""
    alice, bob = make_page(clock=True), make_page()
    sign_in(alice, "alice")
    sign_in(bob, "bob")
    send(alice, "before the crash")
    expect(bob.locator("#messages .message")).to_have_count(1)

    pause_clock(alice)  # hold alice's retry timer until bob has sent while she is away
    killed = kill_worker_of(alice, chat_server.pid)
    status = alice.locator("#status")
    expect(status).to_have_attribute("data-state", "reconnecting")
    expect(status).to_contain_text(re.compile(r"reconnecting in \d+ s"))
    expect(alice.locator("#message-input")).to_be_disabled()
    expect(alice.locator("#composer-note")).not_to_be_empty()

    # bob may have been on the same worker: wait until he is back on a live one.
    expect(bob.locator("#status")).not_to_have_attribute("data-instance", killed)
    expect(bob.locator("#status")).to_have_attribute("data-state", "connected")
    missed = [f"while alice was away #{n}" for n in range(1, 4)]
    for text in missed:
        send(bob, text)

    alice.clock.resume()
    expect(status).to_have_attribute("data-state", "connected")
    expect(alice.locator("#messages .message")).to_have_count(1 + len(missed))
    ids = message_ids(alice)
    assert len(set(ids)) == len(ids)
    assert ids == message_ids(bob)
    expect(alice.locator("#messages .message .text")).to_have_text(["before the crash", *missed])
    assert status.get_attribute("data-instance") != killed


def test_refused_socket_shows_sign_in_and_never_retries(
    make_page: PageFactory, chat_url: str, chat_server: ServerProcess
) -> None:
    """A reconnect refused with 1008 shows the sign-in form and makes no further attempt."""
    page = make_page(clock=True)
    sign_in(page, "mallory")
    attempts = websockets_opened(page)
    before = auth_failures(chat_url)

    page.context.add_cookies(
        [{"name": "authToken", "value": "garbage.not-a.jwt", "url": chat_url, "httpOnly": True}]
    )
    kill_worker_of(page, chat_server.pid)  # the page must reconnect, now with the bad cookie

    expect(page.locator("#login-form")).to_be_visible()
    expect(page.locator("#login-error")).not_to_be_empty()
    expect(page.locator("#status")).to_have_attribute("data-state", "signed-out")
    expect(page.locator("#status")).to_have_attribute("data-last-close", "1008")
    pause_clock(page)
    page.clock.run_for(A_LONG_TIME_MS)
    expect(page.locator("#login-form")).to_be_visible()
    assert len(attempts) == 1, attempts

    after = auth_failures(chat_url)  # every reason: nothing else may have been refused
    refused = sum(after.values()) - sum(before.values())
    assert refused == 1, (before, after)


def test_logout_closes_socket_and_shows_sign_in(make_page: PageFactory) -> None:
    """Sign-out closes the socket, shows the sign-in form, and others see the user leave."""
    erin, frank = make_page(clock=True), make_page()
    socket = sign_in(erin, "erin")
    sign_in(frank, "frank")
    expect(frank.locator("#presence li")).to_have_count(2)
    attempts = websockets_opened(erin)

    with socket.expect_event("close"):
        erin.click("#logout")
    expect(erin.locator("#login-form")).to_be_visible()
    expect(erin.locator("#status")).to_contain_text("signed out")
    expect(erin.locator("#login-error")).to_be_empty()
    assert erin.context.request.get("/auth/me").status == 401
    expect(frank.locator("#presence li")).to_have_count(1)

    pause_clock(erin)
    erin.clock.run_for(A_LONG_TIME_MS)
    assert attempts == []


def test_lapsed_access_cookie_is_refreshed_on_page_load(make_page: PageFactory) -> None:
    """A reload without the access cookie signs in silently with the refresh cookie."""
    page = make_page()
    sign_in(page, "grace")
    page.context.clear_cookies(name="authToken")
    refreshes = requests_to(page, "/auth/refresh")

    page.reload()
    expect(page.locator("#status")).to_have_attribute("data-state", "connected")
    expect(page.locator("#login-form")).to_be_hidden()
    expect(page.locator("#me")).to_have_text("grace")
    assert len(refreshes) == 1


def test_expired_token_close_refreshes_and_reconnects(
    browser: Browser, make_server: Callable[..., ServerProcess], redis_url: str
) -> None:
    """A socket closed 4001 at token expiry refreshes once and reconnects without sign-in."""
    server = make_server(
        workers=2, redis_url=redis_url, env={"CHAT_DEV_TOKEN_TTL": str(SHORT_TOKEN_TTL)}
    )
    context = browser.new_context(base_url=server.url)
    try:
        page = context.new_page()
        page.goto("/")
        socket = sign_in(page, "heidi")
        refreshes = requests_to(page, "/auth/refresh")
        expiry_ms = scaled(SHORT_TOKEN_TTL + 20) * 1000  # token lifetime + leeway + margin
        with page.expect_websocket(timeout=expiry_ms) as reopened:
            socket.wait_for_event("close", timeout=expiry_ms)
        expect(page.locator("#status")).to_have_attribute("data-state", "connected")
        expect(page.locator("#status")).to_have_attribute("data-last-close", "4001")
        expect(page.locator("#login-form")).to_be_hidden()
        assert not reopened.value.is_closed()
        assert len(refreshes) == 1
        send(page, "still here after the refresh")
    finally:
        context.close()


def test_screenshot_of_chat_page(make_page: PageFactory) -> None:
    """Saves tests/output/chat.png: a short conversation, three people online, connected."""
    alice, bob, carol = make_page(width=1200, height=680), make_page(), make_page()
    for page, name in ((alice, "alice"), (bob, "bob"), (carol, "carol")):
        sign_in(page, name)
    for page in (alice, bob):
        join(page, "deploys")
        page.locator("#rooms [data-room=lobby] .room-select").click()
    send(alice, "Morning! Is the 2.4 rollout still on for today?")
    send(bob, "Yes. Canary is green on both replicas, starting the rest at 11.")
    send(carol, "I will post the release notes in #deploys when it is done.")
    send(alice, "Great, I'll watch the dashboards. Ping me if Redis latency moves.")
    bob.locator("#rooms [data-room=deploys] .room-select").click()
    send(bob, "2.4.0 canary: 0 errors in 15 min")

    expect(alice.locator("#messages .message")).to_have_count(4)
    expect(alice.locator("#rooms [data-room=deploys] .room-unread")).to_have_text("1")
    expect(alice.locator("#presence li")).to_have_count(3)
    expect(alice.locator("#status")).to_have_text("connected")
    alice.locator("#message-input").blur()

    OUTPUT.mkdir(parents=True, exist_ok=True)
    alice.screenshot(path=str(OUTPUT / "chat.png"), animations="disabled")
    alice.set_viewport_size({"width": 390, "height": 760})
    alice.screenshot(path=str(OUTPUT / "chat-phone.png"), animations="disabled")
    assert (OUTPUT / "chat.png").stat().st_size > 10_000

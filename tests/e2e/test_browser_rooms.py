"""A private room in the browser: the member reads it, a non-member is told no, and a
revoked member sees it disappear. Chromium against `chatserver --workers 2` on Redis
with room rules; the page fixtures are test_browser.py's."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable

import pytest
from playwright.sync_api import expect

from chatserver.auth.dev import dev_sub
from tests.e2e.test_browser import PageFactory, browser, join, make_page, send, sign_in
from tests.support import ServerProcess

pytestmark = pytest.mark.e2e
__all__ = ["browser", "make_page"]  # fixtures this module uses from test_browser

KEY = "ops-key-0123456789abcdef"


@pytest.fixture
def chat_server(make_server: Callable[..., ServerProcess], redis_url: str) -> ServerProcess:
    """Overrides test_browser's: the same server, with a members-only room family."""
    return make_server(workers=2, redis_url=redis_url, env={
        "CHAT_LOGIN_RATE": "1000", "CHAT_API_KEYS": f"ops:{KEY}",
        "CHAT_ROOM_RULES": "team-* read=members write=members"})


@pytest.fixture
def chat_url(chat_server: ServerProcess) -> str:
    return chat_server.url


def membership(server: ServerProcess, method: str, room: str, username: str) -> None:
    request = urllib.request.Request(
        f"{server.url}/api/rooms/{room}/members/{dev_sub(username)}", method=method,
        headers={"Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert json.loads(response.read())["room"] == room


def test_private_room_member_reads_outsider_refused_revoked_member_loses_it(
    make_page: PageFactory, chat_server: ServerProcess,
) -> None:
    """alice (a member) chats in team-x; eve's join is refused with a clear message and
    the room never appears for her; when alice is revoked, team-x leaves her list."""
    membership(chat_server, "PUT", "team-x", "alice")
    alice, eve = make_page(), make_page()
    sign_in(alice, "alice")
    sign_in(eve, "eve")
    join(alice, "team-x")
    send(alice, "members only")

    eve.fill("#room-input", "team-x")
    eve.press("#room-input", "Enter")
    expect(eve.locator("#join-error")).to_have_text("You may not join # team-x.")
    expect(eve.locator("#rooms [data-room='team-x']")).to_have_count(0)
    expect(eve.locator("#messages")).not_to_contain_text("members only")

    membership(chat_server, "DELETE", "team-x", "alice")
    expect(alice.locator("#rooms [data-room='team-x']")).to_have_count(0)
    expect(alice.locator("#join-error")).to_have_text("You no longer have access to # team-x.")
    expect(alice.locator("#room-title")).to_have_text("# lobby")

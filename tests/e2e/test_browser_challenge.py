"""Browser tests of the Cognito sign-in challenges: the static client in Chromium walks a
user through a new password, TOTP set-up (QR code and key) and code forms, against the
fake Cognito pool and a real chatserver.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator

import pytest
from playwright.sync_api import Page, expect

from tests.cognito_keys import CLIENT_ID
from tests.e2e.test_browser import PageFactory, browser, make_page
from tests.fake_cognito import FakeCognito, PoolUser, totp
from tests.support import ServerProcess, base_env, free_port
from tests.test_signin import SECRET, pool_env

pytestmark = pytest.mark.e2e
__all__ = ["browser", "make_page"]  # fixtures this module uses from test_browser


@pytest.fixture(scope="module")
def pool() -> Iterator[FakeCognito]:
    fake = FakeCognito({CLIENT_ID: SECRET})
    with fake.running():
        yield fake


@pytest.fixture(scope="module")
def chat_url(pool: FakeCognito, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One chatserver on the fake pool, plain-http cookies, static/ at /."""
    port = free_port()
    workdir = tmp_path_factory.mktemp("browser-challenge")
    process = ServerProcess(
        [sys.executable, "-m", "chatserver", "--host", "127.0.0.1", "--port", str(port)],
        base_env(pool_env(pool, CHAT_LOGIN_RATE="100000")), port, 1, workdir,
        workdir / "chatserver.log")
    try:
        process.start()
        yield process.url
    finally:
        process.stop()


def submit_login(page: Page, user: PoolUser, password: str) -> None:
    page.fill("#username", user.username)
    page.fill("#password", password)
    page.press("#password", "Enter")


def expect_chat(page: Page) -> None:
    expect(page.locator("#status")).to_have_attribute("data-state", "connected")
    expect(page.locator("#login-view")).to_be_hidden()


def test_new_password_then_totp_setup_then_code(make_page: PageFactory, pool: FakeCognito) -> None:
    """An admin-created user in an MFA pool: new password form (rules shown), TOTP set-up
    with a QR code and key (a wrong code is refused), the chat; signing in again asks
    for the authenticator's code."""
    user = PoolUser("b-" + uuid.uuid4().hex[:8], "Temp-pw-1", challenge="NEW_PASSWORD_REQUIRED",
                    required_attributes=("name",), then="MFA_SETUP")
    pool.add(user)
    page = make_page()
    submit_login(page, user, user.password)
    form = page.locator("#challenge-form")
    expect(form).to_have_attribute("data-challenge", "NEW_PASSWORD_REQUIRED")
    expect(page.locator("#challenge-rules")).to_contain_text("at least 8 characters")
    page.fill("#challenge-new_password", "short")
    page.fill("#challenge-attr-name", "Browser User")
    page.press("#challenge-new_password", "Enter")
    expect(page.locator("#challenge-error")).to_contain_text("policy")
    page.fill("#challenge-new_password", "Better-pw-2")
    page.press("#challenge-new_password", "Enter")

    expect(form).to_have_attribute("data-challenge", "MFA_SETUP")
    qr = page.locator("#challenge-qr")
    expect(qr).to_be_visible()
    assert (qr.get_attribute("src") or "").startswith("data:image/svg+xml")
    assert qr.evaluate("img => img.complete && img.naturalWidth > 0"), "the QR code renders"
    secret = page.locator("#challenge-secret").inner_text().strip()
    assert (page.locator("#challenge-uri").get_attribute("href") or "").startswith(
        f"otpauth://totp/chatserver:{user.username}?secret={secret}")
    page.fill("#challenge-code", "000000" if totp(secret) != "000000" else "111111")
    page.press("#challenge-code", "Enter")
    expect(page.locator("#challenge-error")).to_have_text("wrong code; try again")
    page.fill("#challenge-code", totp(secret))
    page.press("#challenge-code", "Enter")
    expect_chat(page)
    assert "authChallenge" not in page.evaluate("document.cookie")

    page.click("#logout")
    expect(page.locator("#login-form")).to_be_visible()
    submit_login(page, user, "Better-pw-2")
    expect(form).to_have_attribute("data-challenge", "SOFTWARE_TOKEN_MFA")
    page.fill("#challenge-code", totp(secret))
    page.press("#challenge-code", "Enter")
    expect_chat(page)


def test_sms_code_form_names_destination(make_page: PageFactory, pool: FakeCognito) -> None:
    """SMS_MFA: the code form says where the code went; the code signs in."""
    user = PoolUser("s-" + uuid.uuid4().hex[:8], "Sms-pw-1", challenge="SMS_MFA")
    pool.add(user)
    page = make_page()
    submit_login(page, user, user.password)
    expect(page.locator("#challenge-hint")).to_contain_text("+*******0100")
    page.fill("#challenge-code", pool.sms_codes[user.username])
    page.press("#challenge-code", "Enter")
    expect_chat(page)

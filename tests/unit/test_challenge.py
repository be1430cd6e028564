"""Challenge logic without a process: the 409's fields, ChallengeResponses built from
the browser's answer, Cognito answers mapped to tokens or the next challenge, and the
memory store's single use and expiry."""

from __future__ import annotations

from typing import Any

import pytest

from chatserver.auth.challenge import (
    challenge_fields,
    challenge_responses,
    otpauth_uri,
    required_attributes,
)
from chatserver.auth.challenge_store import MemoryChallengeStore, Pending
from chatserver.auth.cognito import ChallengeRequired, CognitoUnavailable, _tokens_of
from chatserver.config import load_settings

SETTINGS = load_settings({"CHAT_DEV_AUTH": "1"}, env_file=None)


def pending(challenge: str, required: tuple[str, ...] = (), deadline: float = 2e9) -> Pending:
    return Pending(challenge, "SESSION-xyz", "cognito-name", "Typed", deadline, required)


def test_new_password_fields_name_required_attributes_and_rules() -> None:
    """NEW_PASSWORD_REQUIRED asks for the password, the attributes Cognito names, shows the rules."""
    params = {"requiredAttributes": '["userAttributes.name", "userAttributes.phone_number"]',
              "userAttributes": '{"email": "a@example.com"}'}
    fields = challenge_fields("NEW_PASSWORD_REQUIRED", params, SETTINGS)
    assert fields == {"fields": ["new_password", "name", "phone_number"],
                      "password_rules": SETTINGS.password_rules}


@pytest.mark.parametrize("raw", ["", "not json", '{"a": 1}', "[1, 2]"])
def test_required_attributes_tolerates_odd_input(raw: str) -> None:
    """A missing or malformed requiredAttributes asks for nothing extra."""
    assert required_attributes({"requiredAttributes": raw}) == ()


def test_code_challenges_ask_for_a_code() -> None:
    """TOTP and SMS ask for a code; SMS shows the masked destination; no Session anywhere."""
    assert challenge_fields("SOFTWARE_TOKEN_MFA", {}, SETTINGS) == {"fields": ["code"]}
    sms = challenge_fields("SMS_MFA", {"CODE_DELIVERY_DESTINATION": "+***0100"}, SETTINGS)
    assert sms == {"fields": ["code"], "destination": "+***0100"}


def test_new_password_responses() -> None:
    """USERNAME is Cognito's name, not what was typed; attributes get their prefix."""
    body = {"new_password": "N3w-password", "attributes": {"name": " Ann "}}
    assert challenge_responses(pending("NEW_PASSWORD_REQUIRED", ("name",)), body) == {
        "USERNAME": "cognito-name", "NEW_PASSWORD": "N3w-password", "userAttributes.name": "Ann"}


@pytest.mark.parametrize(("challenge", "key"), [("SOFTWARE_TOKEN_MFA", "SOFTWARE_TOKEN_MFA_CODE"),
                                                ("SMS_MFA", "SMS_MFA_CODE")])
def test_code_responses(challenge: str, key: str) -> None:
    assert challenge_responses(pending(challenge), {"code": " 123456 "}) == {
        "USERNAME": "cognito-name", key: "123456"}


@pytest.mark.parametrize(("challenge", "body"), [
    ("NEW_PASSWORD_REQUIRED", {}),
    ("NEW_PASSWORD_REQUIRED", {"new_password": "x" * 257}),
    ("NEW_PASSWORD_REQUIRED", {"new_password": "ok-Passw0rd"}),  # the required name is missing
    ("NEW_PASSWORD_REQUIRED", {"new_password": "ok-Passw0rd", "attributes": ["name"]}),
    ("SOFTWARE_TOKEN_MFA", {"code": "12345"}),
    ("SOFTWARE_TOKEN_MFA", {"code": 123456}),
    ("SMS_MFA", {"code": "12ab56"}),
    ("MFA_SETUP", {"code": "123456"}),  # answered through VerifySoftwareToken instead
])
def test_bad_answers_raise_value_error(challenge: str, body: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        challenge_responses(pending(challenge, ("name",)), body)


def test_otpauth_uri() -> None:
    """Google Authenticator's key URI: issuer:account label, secret and issuer parameters."""
    assert otpauth_uri("chat server", "ann@example.com", "ABC234") == (
        "otpauth://totp/chat%20server:ann@example.com?secret=ABC234&issuer=chat%20server")


def test_answer_with_challenge_maps_to_challenge_required() -> None:
    """A ChallengeName answer raises ChallengeRequired carrying Session and parameters."""
    with pytest.raises(ChallengeRequired) as caught:
        _tokens_of(200, {"ChallengeName": "SMS_MFA", "Session": "S1",
                         "ChallengeParameters": {"CODE_DELIVERY_DESTINATION": "+1"}})
    assert (caught.value.challenge, caught.value.session) == ("SMS_MFA", "S1")
    assert caught.value.parameters == {"CODE_DELIVERY_DESTINATION": "+1"}
    assert "S1" not in str(caught.value), "the Session is never in the exception's text"


def test_answer_with_tokens_maps_to_tokens() -> None:
    tokens = _tokens_of(200, {"AuthenticationResult": {"AccessToken": "a", "IdToken": "i",
                                                       "ExpiresIn": 60}})
    assert (tokens.access_token, tokens.id_token, tokens.refresh_token) == ("a", "i", None)
    with pytest.raises(CognitoUnavailable):
        _tokens_of(200, {"AuthenticationResult": {"AccessToken": "a"}})


def test_pending_repr_hides_the_session() -> None:
    assert "SESSION-xyz" not in repr(pending("SMS_MFA"))


async def test_memory_store_is_single_use_and_expires() -> None:
    """take() returns a pending challenge once; an expired one is gone; ids are opaque."""
    now = [1000.0]
    store = MemoryChallengeStore(clock=lambda: now[0])
    first = await store.put(pending("SMS_MFA", deadline=1180.0))
    second = await store.put(pending("SMS_MFA", deadline=1180.0))
    assert first != second and "SESSION" not in first and len(first) >= 40
    taken = await store.take(first)
    assert taken is not None and taken.session == "SESSION-xyz"
    assert await store.take(first) is None
    now[0] = 1180.0
    assert await store.take(second) is None
    assert await store.take("unknown") is None

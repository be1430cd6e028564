"""TokenVerifier's rules with a JWKS document in memory and a fake clock: each forged
kind refused with its reason, the unknown-kid refetch and penalty box, shared fetches,
JWKS outages, parse_jwks's key filter and the verified-token cache."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding

from chatserver.auth.tokens import KeysUnavailable, TokenError, TokenVerifier, User, parse_jwks
from tests.cognito_keys import CLIENT_ID, ISSUER, POOL_ID, REGION, SigningKey

# RSA key generation is the slow part: three keys, once per module.
KEY = SigningKey()
OTHER = SigningKey()  # the same kid as KEY, a key the pool never published
ROTATED = SigningKey("rotated-kid")  # published later, as on a Cognito key rotation

ISSUER_FORM_2 = f"https://issuer.cognito-idp.{REGION}.amazonaws.com/{POOL_ID}"
LEEWAY = 5.0
PENALTY = 10.0


class Clock:
    """The verifier's clock; starts at wall time, since PyJWT checks exp on wall time."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


class Jwks:
    """The fetch_jwks callable: a JWKS document in memory, counting its calls."""

    def __init__(self, *keys: SigningKey) -> None:
        self.document: dict[str, Any] = {"keys": [key.jwk() for key in keys]}
        self.calls = 0
        self.failing = False
        self.held: asyncio.Event | None = None  # when set, each fetch waits for it

    def publish(self, key: SigningKey) -> None:
        self.document = {"keys": [*self.document["keys"], key.jwk()]}

    async def __call__(self) -> dict[str, Any]:
        self.calls += 1
        if self.held is not None:
            await self.held.wait()
        if self.failing:
            raise OSError("HTTP 503 from JWKS endpoint")
        return self.document


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def jwks() -> Jwks:
    return Jwks(KEY)


@pytest.fixture
def make_verifier(jwks: Jwks, clock: Clock) -> Callable[..., TokenVerifier]:
    def make(token_uses: tuple[str, ...] = ("access",)) -> TokenVerifier:
        return TokenVerifier(
            issuers=[ISSUER, ISSUER_FORM_2], client_id=CLIENT_ID, token_uses=token_uses,
            fetch_jwks=jwks, leeway=LEEWAY, penalty_seconds=PENALTY, clock=clock,
        )
    return make


@pytest.fixture
def verifier(make_verifier: Callable[..., TokenVerifier]) -> TokenVerifier:
    return make_verifier()


async def refusal(verifier: TokenVerifier, token: str | None) -> str:
    with pytest.raises(TokenError) as caught:
        await verifier.verify(token)
    return caught.value.reason


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def segments(header: dict[str, Any], claims: dict[str, Any]) -> str:
    return b64(json.dumps(header).encode()) + "." + b64(json.dumps(claims).encode())


def rs256(header: dict[str, Any], claims: dict[str, Any], key: SigningKey = KEY) -> str:
    """Signed by hand, for headers PyJWT refuses to write (a kid that is not a string)."""
    signed = segments(header, claims)
    signature = key.key.sign(signed.encode(), padding.PKCS1v15(), hashes.SHA256())
    return signed + "." + b64(signature)


def hs256_with_public_key(claims: dict[str, Any]) -> str:
    """The key-confusion forgery: HS256 keyed with the RSA public key's PEM."""
    secret = KEY.key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    signed = segments({"alg": "HS256", "typ": "JWT", "kid": KEY.kid}, claims)
    return signed + "." + b64(hmac.new(secret, signed.encode(), hashlib.sha256).digest())


def without(claims: dict[str, Any], name: str) -> dict[str, Any]:
    return {k: v for k, v in claims.items() if k != name}


def forged() -> dict[str, tuple[str | None, str]]:
    """name -> (token, the reason an access-token verifier gives for refusing it)."""
    now = int(time.time())
    good = KEY.claims()
    token = KEY.mint(good)
    head, _, signature = token.rpartition(".")
    tampered = head.partition(".")[0] + "." + b64(json.dumps(dict(good, sub="admin")).encode())
    return {
        "none": (None, "missing"),
        "empty": ("", "missing"),
        "garbage": ("garbage", "malformed"),
        "not.a.jwt": ("not.a.jwt", "malformed"),
        "two-segments": (head, "malformed"),
        "four-segments": (token + ".x", "malformed"),
        "header-not-object": (b64(b"[1]") + ".e30.x", "malformed"),
        "alg-none": (jwt.encode(good, None, algorithm="none", headers={"kid": KEY.kid}),
                     "bad_algorithm"),
        "hs256-with-public-key": (hs256_with_public_key(good), "bad_algorithm"),
        "rs512": (jwt.encode(good, KEY.key, algorithm="RS512", headers={"kid": KEY.kid}),
                  "bad_algorithm"),
        "ps256": (jwt.encode(good, KEY.key, algorithm="PS256", headers={"kid": KEY.kid}),
                  "bad_algorithm"),
        "no-kid": (jwt.encode(good, KEY.key, algorithm="RS256"), "missing_kid"),
        "kid-not-string": (rs256({"alg": "RS256", "kid": 5}, good), "missing_kid"),
        "signed-by-other-key": (OTHER.mint(good), "bad_signature"),
        "claims-swapped-after-signing": (tampered + "." + signature, "bad_signature"),
        "expired": (KEY.mint(dict(good, iat=now - 7200, exp=now - 3600)), "expired"),
        "nbf-future": (KEY.mint(dict(good, nbf=now + 3600)), "not_yet_valid"),
        "exp-not-a-number": (KEY.mint(dict(good, exp="soon")), "invalid"),
        "wrong-iss": (KEY.mint(dict(good, iss=ISSUER + "x")), "bad_issuer"),
        "iss-trailing-slash": (KEY.mint(dict(good, iss=ISSUER + "/")), "bad_issuer"),
        "iss-http": (KEY.mint(dict(good, iss=ISSUER.replace("https:", "http:"))), "bad_issuer"),
        "iss-other-region": (KEY.mint(dict(good, iss=ISSUER.replace(REGION, "eu-west-1"))),
                             "bad_issuer"),
        "refresh-token-use": (KEY.mint(dict(good, token_use="refresh")), "bad_token_use"),
        "no-token-use": (KEY.mint(without(good, "token_use")), "bad_token_use"),
        "id-token": (KEY.mint(KEY.claims(token_use="id")), "bad_token_use"),
        "wrong-client-id": (KEY.mint(dict(good, client_id="otherclient")), "bad_audience"),
        "no-client-id": (KEY.mint(without(good, "client_id")), "bad_audience"),
        "client-id-only-in-aud": (KEY.mint(dict(without(good, "client_id"), aud=CLIENT_ID)),
                                  "bad_audience"),
        "no-exp": (KEY.mint(without(good, "exp")), "missing_claim"),
        "no-sub": (KEY.mint(without(good, "sub")), "missing_claim"),
        "no-iss": (KEY.mint(without(good, "iss")), "missing_claim"),
    }


# ---------------------------------------------------------------- accepted


async def test_good_access_token_gives_its_user(verifier: TokenVerifier) -> None:
    """A valid access token yields its sub, username, groups, exp and iat."""
    claims = KEY.claims(sub="alice", **{"cognito:groups": ["admins"]})
    user = await verifier.verify(KEY.mint(claims))
    assert user == User(sub="alice", username="alice", groups=("admins",), exp=claims["exp"],
                        iat=claims["iat"])


async def test_second_issuer_form_is_accepted(verifier: TokenVerifier) -> None:
    """A token from the issuer.cognito-idp form of the pool's issuer is accepted."""
    user = await verifier.verify(KEY.mint(KEY.claims(sub="bob", iss=ISSUER_FORM_2)))
    assert user.sub == "bob"


async def test_id_token_is_accepted_by_an_id_verifier(
    make_verifier: Callable[..., TokenVerifier],
) -> None:
    """An ID token for this client is accepted where token_use id is expected."""
    user = await make_verifier(("id",)).verify(KEY.mint(KEY.claims(sub="carol", token_use="id")))
    assert (user.sub, user.username) == ("carol", "carol")


async def test_expired_within_leeway_is_accepted(verifier: TokenVerifier) -> None:
    """A token expired for less than the leeway is still accepted."""
    now = int(time.time())
    user = await verifier.verify(KEY.mint(KEY.claims(sub="late", exp=now - 2)))
    assert user.sub == "late"


# ----------------------------------------------------------------- refused


@pytest.mark.parametrize("kind", list(forged()))
async def test_forged_token_is_refused_with_its_reason(verifier: TokenVerifier, kind: str) -> None:
    """Each forged, stale, misdirected or malformed token is refused, saying why."""
    token, reason = forged()[kind]
    assert await refusal(verifier, token) == reason


async def test_expired_past_leeway_is_refused(verifier: TokenVerifier) -> None:
    """A token expired for longer than the leeway is refused as expired."""
    now = int(time.time())
    token = KEY.mint(KEY.claims(exp=now - int(LEEWAY) - 5))
    assert await refusal(verifier, token) == "expired"


@pytest.mark.parametrize(("claims", "reason"), [
    ({"aud": "otherclient"}, "bad_audience"),
    ({"aud": [CLIENT_ID, "otherclient"]}, "bad_audience"),
    ({"token_use": "access"}, "bad_token_use"),
], ids=["wrong-aud", "aud-list", "access-token"])
async def test_id_verifier_refuses_misdirected_tokens(
    make_verifier: Callable[..., TokenVerifier], claims: dict[str, Any], reason: str,
) -> None:
    """Where ID tokens are expected, aud must be this client and token_use must be id."""
    token = KEY.mint(dict(KEY.claims(token_use="id"), **claims))
    assert await refusal(make_verifier(("id",)), token) == reason


async def test_deeply_nested_header_is_malformed(verifier: TokenVerifier) -> None:
    """A header of 2000 nested arrays (a 2.7 kB cookie) is refused as malformed."""
    assert await refusal(verifier, b64(b"[" * 2000) + ".e30.x") == "malformed"


async def test_token_with_undecodable_byte_is_malformed(verifier: TokenVerifier) -> None:
    """A cookie holding a byte that is not UTF-8 is refused as malformed."""
    assert await refusal(verifier, "\udcff" + KEY.mint()) == "malformed"


async def test_expiry_follows_the_verifiers_clock(verifier: TokenVerifier, clock: Clock) -> None:
    """A token past exp + leeway by the verifier's clock is refused as expired."""
    claims = KEY.claims()
    clock.now = claims["exp"] + LEEWAY + 1
    assert await refusal(verifier, KEY.mint(claims)) == "expired"


# ------------------------------------------------------- unknown kid, penalty box


async def test_unknown_kid_refetches_once(verifier: TokenVerifier, jwks: Jwks) -> None:
    """An unknown kid costs one JWKS refetch, then is refused."""
    await verifier.verify(KEY.mint())
    assert jwks.calls == 1
    assert await refusal(verifier, KEY.mint(kid="forged-1")) == "unknown_kid"
    assert jwks.calls == 2


async def test_second_unknown_kid_in_penalty_makes_no_fetch(
    verifier: TokenVerifier, jwks: Jwks, clock: Clock,
) -> None:
    """Within penalty_seconds of an unknown kid, another unknown kid is refused unfetched."""
    assert await refusal(verifier, KEY.mint(kid="forged-1")) == "unknown_kid"
    calls = jwks.calls
    clock.now += PENALTY - 1
    assert await refusal(verifier, KEY.mint(kid="forged-2")) == "unknown_kid"
    assert jwks.calls == calls


async def test_unknown_kid_after_penalty_fetches_again(
    verifier: TokenVerifier, jwks: Jwks, clock: Clock,
) -> None:
    """Once penalty_seconds have passed, an unknown kid gets one fetch again."""
    assert await refusal(verifier, KEY.mint(kid="forged-1")) == "unknown_kid"
    calls = jwks.calls
    clock.now += PENALTY + 1
    assert await refusal(verifier, KEY.mint(kid="forged-2")) == "unknown_kid"
    assert jwks.calls == calls + 1


async def test_known_kid_verifies_inside_the_penalty_box(
    verifier: TokenVerifier, jwks: Jwks,
) -> None:
    """The penalty box blocks fetches, not tokens signed by a key already known."""
    assert await refusal(verifier, KEY.mint(kid="forged-1")) == "unknown_kid"
    calls = jwks.calls
    assert (await verifier.verify(KEY.mint(KEY.claims(sub="dave")))).sub == "dave"
    assert jwks.calls == calls


async def test_rotated_key_is_found_by_the_refetch(verifier: TokenVerifier, jwks: Jwks) -> None:
    """A key published after the first fetch is picked up by the unknown-kid refetch."""
    await verifier.verify(KEY.mint())
    jwks.publish(ROTATED)
    assert (await verifier.verify(ROTATED.mint(ROTATED.claims(sub="erin")))).sub == "erin"
    assert jwks.calls == 2


async def test_concurrent_unknown_kids_share_one_fetch(
    verifier: TokenVerifier, jwks: Jwks,
) -> None:
    """20 verifications of forged kids in flight together cause one JWKS fetch."""
    await verifier.prefetch()
    jwks.held = asyncio.Event()

    async def release() -> None:
        assert jwks.held is not None
        jwks.held.set()  # runs after every verify below is waiting on the fetch

    tokens = [KEY.mint(kid=f"forged-{i}") for i in range(20)]
    results = await asyncio.gather(
        *(verifier.verify(t) for t in tokens), release(), return_exceptions=True
    )
    assert [getattr(r, "reason", r) for r in results[:-1]] == ["unknown_kid"] * 20
    assert jwks.calls == 2


async def test_concurrent_rotated_kid_shares_one_fetch(
    verifier: TokenVerifier, jwks: Jwks,
) -> None:
    """20 verifications of a newly rotated kid in flight together: one fetch, all accepted."""
    await verifier.prefetch()
    jwks.publish(ROTATED)
    jwks.held = asyncio.Event()

    async def release() -> None:
        assert jwks.held is not None
        jwks.held.set()

    tokens = [ROTATED.mint(ROTATED.claims(sub=f"u{i}")) for i in range(20)]
    *users, _ = await asyncio.gather(*(verifier.verify(t) for t in tokens), release())
    assert [user.sub for user in users] == [f"u{i}" for i in range(20)]
    assert jwks.calls == 2


# ---------------------------------------------------------------- JWKS outages


async def test_failed_fetch_keeps_the_old_keys(verifier: TokenVerifier, jwks: Jwks) -> None:
    """While the JWKS is down, an unknown kid is refused and known keys keep verifying."""
    await verifier.verify(KEY.mint())
    jwks.failing = True
    assert await refusal(verifier, KEY.mint(kid="forged-1")) == "unknown_kid"
    assert jwks.calls == 2
    assert (await verifier.verify(KEY.mint(KEY.claims(sub="frank")))).sub == "frank"


async def test_no_keys_and_failed_fetch_is_keys_unavailable(
    verifier: TokenVerifier, jwks: Jwks,
) -> None:
    """With no keys yet and the JWKS down, verify raises the retryable KeysUnavailable."""
    jwks.failing = True
    with pytest.raises(KeysUnavailable) as caught:
        await verifier.verify(KEY.mint())
    assert caught.value.reason == "jwks_unavailable"


async def test_keys_unavailable_backs_off_then_retries(
    verifier: TokenVerifier, jwks: Jwks, clock: Clock,
) -> None:
    """With no keys cached, a failed fetch backs off: tokens within the backoff get
    KeysUnavailable (retryable, 1011) without a fetch; after it the JWKS is asked again."""
    jwks.failing = True
    with pytest.raises(KeysUnavailable):
        await verifier.verify(KEY.mint())
    jwks.failing = False
    with pytest.raises(KeysUnavailable):
        await verifier.verify(KEY.mint())
    assert jwks.calls == 1 and not verifier.ready
    clock.now += 1.5
    assert (await verifier.verify(KEY.mint(KEY.claims(sub="gina")))).sub == "gina"
    assert jwks.calls == 2 and verifier.ready


async def test_backoff_doubles_while_the_jwks_stays_down(
    verifier: TokenVerifier, jwks: Jwks, clock: Clock,
) -> None:
    """Each failed fetch with no keys doubles the wait before the next one."""
    jwks.failing = True
    for wait in (1.0, 2.0, 4.0):
        with pytest.raises(KeysUnavailable):
            await verifier.verify(KEY.mint())
        calls = jwks.calls
        clock.now += wait - 0.1
        with pytest.raises(KeysUnavailable):
            await verifier.verify(KEY.mint())
        assert jwks.calls == calls
        clock.now += 0.2


async def test_empty_or_broken_jwks_never_replaces_cached_keys(
    verifier: TokenVerifier, jwks: Jwks, clock: Clock,
) -> None:
    """A JWKS that turns into {"keys": []} (or only bad keys) keeps the good keys cached."""
    await verifier.verify(KEY.mint())
    jwks.document = {"keys": []}
    with pytest.raises(TokenError, match="kid"):
        await verifier.verify(KEY.mint(kid="rotated-away"))
    assert (await verifier.verify(KEY.mint(KEY.claims(sub="hal")))).sub == "hal"


def test_a_malformed_key_is_skipped_not_fatal() -> None:
    """A key whose n is not a string is skipped; the others are kept."""
    bad = dict(ROTATED.jwk(), n=12345)
    assert list(parse_jwks({"keys": [bad, KEY.jwk()]})) == [KEY.kid]


@pytest.mark.parametrize("document", [{}, {"keys": {}}, {"keys": None}, []],
                         ids=["no-keys", "keys-object", "keys-null", "not-an-object"])
async def test_jwks_without_keys_list_is_a_failed_fetch(
    verifier: TokenVerifier, jwks: Jwks, document: Any,
) -> None:
    """A JWKS document with no keys list counts as an outage, not as an empty key set."""
    jwks.document = document
    with pytest.raises(KeysUnavailable):
        await verifier.verify(KEY.mint())


async def test_prefetch_warms_the_keys(verifier: TokenVerifier, jwks: Jwks) -> None:
    """After prefetch, the first token needs no fetch."""
    await verifier.prefetch()
    await verifier.verify(KEY.mint())
    assert jwks.calls == 1


async def test_prefetch_survives_an_outage(
    verifier: TokenVerifier, jwks: Jwks, clock: Clock
) -> None:
    """prefetch with the JWKS down does not raise; after the backoff a token fetches again."""
    jwks.failing = True
    await verifier.prefetch()
    jwks.failing = False
    clock.now += 1.5
    await verifier.verify(KEY.mint())
    assert jwks.calls == 2


# ------------------------------------------------------------------- parse_jwks


def test_parse_jwks_keeps_only_rsa_signing_keys() -> None:
    """Only RSA keys with a kid, for signing with RS256 (or unstated), are kept."""
    base = ROTATED.jwk()
    document = {"keys": [
        KEY.jwk(),
        dict(base, kid="enc", use="enc"),
        dict(base, kid="rs512", alg="RS512"),
        dict(base, kid="ec", kty="EC"),
        {k: v for k, v in base.items() if k != "kid"},
        dict(base, kid=""),
        {k: v for k, v in dict(base, kid="bare").items() if k not in ("use", "alg")},
        dict(base, kid="bad-n", n="!!!"),
        {"kid": "no-numbers", "kty": "RSA"},
        "not-a-jwk",
    ]}
    assert set(parse_jwks(document)) == {KEY.kid, "bare"}


@pytest.mark.parametrize("document", [{}, {"keys": "x"}, []])
def test_parse_jwks_without_keys_list_raises(document: Any) -> None:
    """A document without a keys list is a ValueError."""
    with pytest.raises(ValueError, match="keys"):
        parse_jwks(document)


async def test_token_signed_with_an_encryption_key_is_unknown_kid(
    verifier: TokenVerifier, jwks: Jwks,
) -> None:
    """A key published for encryption does not verify signatures."""
    jwks.document = {"keys": [KEY.jwk(), dict(ROTATED.jwk(), use="enc")]}
    assert await refusal(verifier, ROTATED.mint()) == "unknown_kid"


# ----------------------------------------------------------------- cached tokens


async def test_cache_returns_the_same_user_until_exp(
    verifier: TokenVerifier, clock: Clock,
) -> None:
    """A token verified once is answered from the cache until exp + leeway."""
    claims = KEY.claims()
    token = KEY.mint(claims)
    first = await verifier.verify(token)
    clock.now = claims["exp"] + LEEWAY - 1
    assert await verifier.verify(token) is first


async def test_cache_drops_the_user_after_exp(verifier: TokenVerifier, clock: Clock) -> None:
    """Past exp + leeway the cached user is not served: the token is refused as expired."""
    claims = KEY.claims()
    token = KEY.mint(claims)
    await verifier.verify(token)
    clock.now = claims["exp"] + LEEWAY + 1
    assert await refusal(verifier, token) == "expired"


async def test_cache_does_not_serve_a_refused_token(verifier: TokenVerifier) -> None:
    """A refused token is not cached: it is refused again, for the same reason."""
    token = OTHER.mint()
    assert await refusal(verifier, token) == "bad_signature"
    assert await refusal(verifier, token) == "bad_signature"

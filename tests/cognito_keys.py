"""Test-side Cognito stand-ins: an RSA signing key, a JWKS server on a free port that
counts its hits, and a minting helper for Cognito-shaped tokens (good and forged).
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

REGION = "us-east-1"
POOL_ID = "us-east-1_TestPool"
CLIENT_ID = "testclient123"
ISSUER = f"https://cognito-idp.{REGION}.amazonaws.com/{POOL_ID}"
KID = "test-kid-1"


def b64u(number: int) -> str:
    raw = number.to_bytes((number.bit_length() + 7) // 8, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


class SigningKey:
    def __init__(self, kid: str = KID) -> None:
        self.kid = kid
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def jwk(self) -> dict[str, str]:
        numbers = self.key.public_key().public_numbers()
        return {"kty": "RSA", "kid": self.kid, "use": "sig", "alg": "RS256",
                "n": b64u(numbers.n), "e": b64u(numbers.e)}

    def claims(self, sub: str = "user-1", token_use: str = "access", **extra: Any) -> dict[str, Any]:
        now = int(time.time())
        claims: dict[str, Any] = {"sub": sub, "iss": ISSUER, "token_use": token_use,
                                  "iat": now, "exp": now + 3600, "username": sub}
        if token_use == "access":
            claims["client_id"] = CLIENT_ID
        else:
            claims["aud"] = CLIENT_ID
            claims["cognito:username"] = sub
        claims.update(extra)
        return claims

    def mint(self, claims: dict[str, Any] | None = None, kid: str | None = None) -> str:
        return jwt.encode(claims or self.claims(), self.key, algorithm="RS256",
                          headers={"kid": kid or self.kid})


class JwksServer:
    """Serves {"keys": [...]} at /jwks.json and counts the requests."""

    def __init__(self, keys: list[dict[str, str]]) -> None:
        self.keys = keys
        self.hits = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.hits += 1
                body = json.dumps({"keys": outer.keys}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                return None

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/jwks.json"

    @contextmanager
    def running(self) -> Iterator[JwksServer]:
        thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self.httpd.shutdown()
            self.httpd.server_close()
            thread.join(5)


def cognito_env(jwks_url: str, **extra: str) -> dict[str, str]:
    env = {"AWS_REGION": REGION, "AWS_COGNITO_USER_POOL_ID": POOL_ID,
           "AWS_COGNITO_CLIENT_ID": CLIENT_ID, "AWS_COGNITO_JWKS_URL": jwks_url}
    env.update(extra)
    return env

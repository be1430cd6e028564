"""The sign-in cookies' names, and reading a cookie so that none can be planted.

With Secure cookies (the default) the names carry the browsers' prefixes:
`__Host-authToken` (Secure, Path=/, no Domain: no other host, not even a sibling
subdomain, can set it) and `__Secure-refreshToken` (its Path=/auth rules out __Host-).
The original design's names, `authToken` and `refreshToken`, are what it must be without
Secure, and are read besides the prefixed ones only where no sibling host could plant
them (every allowed origin an IP address or localhost, as in a benchmark or on a
laptop), or when CHAT_LEGACY_COOKIES=1 says so. A request that carries a cookie twice,
under one name or both, is refused: which one the browser meant cannot be known.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from aiohttp import web

from ..config import Settings
from .tokens import TokenError

AUTH = "authToken"
REFRESH = "refreshToken"
CHALLENGE = "authChallenge"  # a pending Cognito challenge's opaque id (auth/challenge.py)


class AmbiguousCookie(TokenError):
    """The request carries the cookie more than once."""

    def __init__(self, name: str) -> None:
        super().__init__("duplicate_cookie", f"more than one {name} cookie")


@dataclass(frozen=True, slots=True)
class Cookie:
    """One cookie: the name it is set under, and every name it is read from."""

    name: str
    accepted: tuple[str, ...]
    _pattern: re.Pattern[str]

    @classmethod
    def named(cls, name: str, *also: str) -> Cookie:
        names = (name, *also)
        alternatives = "|".join(re.escape(n) for n in names)
        return cls(name, names, re.compile(rf"(?:^|;)\s*(?:{alternatives})="))

    def read(self, request: web.Request) -> str | None:
        """The cookie's value, or None; AmbiguousCookie when it is there twice."""
        headers = request.headers.getall("Cookie", ())
        if not headers:
            return None
        if sum(len(self._pattern.findall(header)) for header in headers) > 1:
            raise AmbiguousCookie(self.name)
        cookies = request.cookies
        for name in self.accepted:
            value = cookies.get(name)
            if value is not None:
                return value
        return None


@dataclass(frozen=True, slots=True)
class CookieNames:
    auth: Cookie
    refresh: Cookie
    challenge: Cookie  # never the unprefixed name when Secure: it is new, nothing sends it


def cookie_names(settings: Settings) -> CookieNames:
    if not settings.cookie_secure:
        return CookieNames(Cookie.named(AUTH), Cookie.named(REFRESH), Cookie.named(CHALLENGE))
    legacy = settings.legacy_cookies == "1" or (
        settings.legacy_cookies == "auto" and all(map(_no_siblings, settings.allowed_origins)))
    also = (AUTH,) if legacy else ()
    return CookieNames(Cookie.named(f"__Host-{AUTH}", *also),
                       Cookie.named(f"__Secure-{REFRESH}", *((REFRESH,) if legacy else ())),
                       Cookie.named(f"__Secure-{CHALLENGE}"))


def _no_siblings(origin: str) -> bool:
    """True for an origin whose host has no sibling that could set a cookie for it."""
    host = urlsplit(origin).hostname or ""
    if host == "localhost":
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True

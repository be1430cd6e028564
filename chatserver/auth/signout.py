"""What a sign-out revokes besides closing sockets: the access token's `jti` and the dev
refresh token's `jti` go into the denylist until they expire; "everywhere" also records
the user's "not before" time and calls Cognito's GlobalSignOut.
"""

from __future__ import annotations

import asyncio
import logging
import time

from .cognito import CognitoClient, CognitoError, CognitoUnavailable
from .denylist import Denylist
from .tokens import TokenError, TokenVerifier, User

log = logging.getLogger(__name__)

GLOBAL_SIGN_OUT_TIMEOUT = 2.0  # seconds a sign-out waits for Cognito's GlobalSignOut


class Revoker:
    def __init__(self, denylist: Denylist, *, token_use: str,
                 refresh_verifier: TokenVerifier | None = None,
                 cognito: CognitoClient | None = None) -> None:
        self._denylist = denylist
        self._token_use = token_use
        self._refresh_verifier = refresh_verifier  # dev refresh tokens (JWTs with a jti)
        self._cognito = cognito

    async def sign_out(self, user: User | None, token: str, refresh: str | None,
                       everywhere: bool) -> None:
        """`user` is the verified cookie's (None when it was missing or refused)."""
        if user is not None and user.jti:
            await self._denylist.revoke(user.jti, user.exp)
        if refresh and self._refresh_verifier is not None:
            try:
                old = await self._refresh_verifier.verify(refresh)
            except TokenError:
                old = None  # refused already: nothing more to refuse
            if old is not None and old.jti:
                await self._denylist.revoke(old.jti, old.exp)
        if everywhere and user is not None:
            await self._denylist.revoke_before(user.sub, time.time())
            await self._global_sign_out(token)

    async def _global_sign_out(self, token: str) -> None:
        """Cognito revokes the user's refresh tokens on every device. It takes an access
        token: with CHAT_TOKEN_USE=id the cookie holds an ID token, and the "not before"
        time (plus this session's RevokeToken) is all there is. Best effort, bounded."""
        if self._cognito is None or self._token_use != "access":
            return
        try:
            await asyncio.wait_for(self._cognito.global_sign_out(token), GLOBAL_SIGN_OUT_TIMEOUT)
        except (CognitoError, CognitoUnavailable, TimeoutError) as exc:
            log.info("GlobalSignOut failed at sign-out: %s", type(exc).__name__)

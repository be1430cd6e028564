"""The API for backend services, with bearer keys (CHAT_API_KEYS, each optionally scoped
to a room glob): publish to a room, and manage the room memberships the rules grant.

    POST   /api/rooms/{room}/messages        {"message": "..."}
    PUT    /api/rooms/{room}/members/{sub}   {"role": "read"|"write"} (optional; write)
    DELETE /api/rooms/{room}/members/{sub}
    GET    /api/rooms/{room}/members?after=<sub>&limit=<n>
    GET    /api/users/{sub}/rooms
"""

from __future__ import annotations

import fnmatch
import hmac
import json
from typing import Any

from aiohttp import web

from .broker.base import BrokerUnavailable
from .chat import ChatService
from .config_parsers import ApiKey
from .memberships import MAX_PAGE, ROLES
from .protocol import ROOM_NAME, ROOM_RULE, SUB
from .responses import error

MAX_MEMBER_BODY = 1024  # bytes of a membership request body


class ApiRoutes:
    def __init__(self, chat: ChatService, api_keys: tuple[ApiKey, ...], max_chars: int):
        self._chat = chat
        self._keys = [(name, key.encode(), glob) for name, key, glob in api_keys]
        self._max_chars = max_chars

    def add_to(self, router: web.UrlDispatcher) -> None:
        router.add_post("/api/rooms/{room}/messages", self.publish)
        router.add_put("/api/rooms/{room}/members/{sub}", self.grant)
        router.add_delete("/api/rooms/{room}/members/{sub}", self.revoke)
        router.add_get("/api/rooms/{room}/members", self.members)
        router.add_get("/api/users/{sub}/rooms", self.rooms_of)

    def key_for(self, authorization: str) -> tuple[str, str] | None:
        """(service, room glob) of the key presented; every key is compared, each in
        constant time. aiohttp hands non-UTF-8 header bytes in as surrogates: compare
        them as bytes."""
        scheme, _, presented = authorization.partition(" ")
        if scheme.lower() != "bearer" or not presented:
            return None
        candidate = presented.encode("utf-8", "surrogateescape")
        found = None
        for name, key, glob in self._keys:
            if hmac.compare_digest(candidate, key):
                found = (name, glob)
        return found

    def _authorize(self, request: web.Request) -> tuple[str, web.Response | None]:
        """The service, or the answer refusing the request (401, 403, 400)."""
        key = self.key_for(request.headers.get("Authorization", ""))
        if key is None:
            detail = "a valid Authorization: Bearer <key> is required"
            return "", error(401, "unauthenticated", detail)
        service, glob = key
        room = request.match_info.get("room")
        if room is not None and not ROOM_NAME.fullmatch(room):
            return service, error(400, "bad_request", ROOM_RULE)
        if room is not None and not fnmatch.fnmatchcase(room, glob):
            return service, error(403, "forbidden", "this key is not for that room")
        if room is None and glob != "*":
            return service, error(403, "forbidden", "this key is scoped to some rooms only")
        sub = request.match_info.get("sub")
        if sub is not None and not SUB.fullmatch(sub):
            return service, error(400, "bad_request", "sub must be a user id")
        return service, None

    async def publish(self, request: web.Request) -> web.Response:
        service, refused = self._authorize(request)
        if refused is not None:
            return refused
        room = request.match_info["room"]
        try:
            body = await request.json()
        except (ValueError, RecursionError):
            return error(400, "bad_request", "body must be JSON")
        text = body.get("message") if isinstance(body, dict) else None
        if not isinstance(text, str) or not text.strip():
            return error(400, "bad_request", "message must be a non-empty string")
        if len(text) > self._max_chars:
            return error(413, "too_large", f"message is over {self._max_chars} characters")
        if not self._chat.gate.rules.rule_for(room):
            return error(403, "forbidden", "no room rule covers this room")
        try:
            message_id = await self._chat.publish_as_service(service, room, text)
        except BrokerUnavailable:
            return error(503, "unavailable", "the message broker is unavailable")
        return web.json_response({"id": message_id})

    async def grant(self, request: web.Request) -> web.Response:
        _, refused = self._authorize(request)
        if refused is not None:
            return refused
        body = await _small_json(request)
        if isinstance(body, web.Response):
            return body
        role = body.get("role", "write") if isinstance(body, dict) else None
        if role not in ROLES:
            return error(400, "bad_request", 'role must be "read" or "write"')
        room, sub = request.match_info["room"], request.match_info["sub"]
        return await self._stored(self._chat.grant(room, sub, role), {"room": room,
                                  "sub": sub, "role": role})

    async def revoke(self, request: web.Request) -> web.Response:
        _, refused = self._authorize(request)
        if refused is not None:
            return refused
        room, sub = request.match_info["room"], request.match_info["sub"]
        try:
            found = await self._chat.revoke(room, sub)
        except BrokerUnavailable:
            return error(503, "unavailable", "the membership store is unavailable")
        return web.json_response({"room": room, "sub": sub, "revoked": found})

    async def members(self, request: web.Request) -> web.Response:
        _, refused = self._authorize(request)
        if refused is not None:
            return refused
        after = request.query.get("after") or None
        try:
            limit = int(request.query.get("limit", "100"))
        except ValueError:
            limit = 0
        if not 1 <= limit <= MAX_PAGE or (after is not None and not SUB.fullmatch(after)):
            return error(400, "bad_request", f"limit must be 1-{MAX_PAGE}; after a user id")
        try:
            page, following = await self._chat.gate.memberships.members(
                request.match_info["room"], after, limit)
        except BrokerUnavailable:
            return error(503, "unavailable", "the membership store is unavailable")
        return web.json_response({"members": [{"sub": s, "role": r} for s, r in page],
                                  "next": following})

    async def rooms_of(self, request: web.Request) -> web.Response:
        _, refused = self._authorize(request)
        if refused is not None:
            return refused
        try:
            rooms = await self._chat.gate.memberships.rooms_of(request.match_info["sub"])
        except BrokerUnavailable:
            return error(503, "unavailable", "the membership store is unavailable")
        return web.json_response({"rooms": [{"room": m, "role": r} for m, r in rooms]})

    async def _stored(self, action: Any, answer: dict[str, str]) -> web.Response:
        try:
            await action
        except BrokerUnavailable:
            return error(503, "unavailable", "the membership store is unavailable")
        return web.json_response(answer)


async def _small_json(request: web.Request) -> Any:
    """The body as JSON ({} when empty), or a 400 answer: oversized or not JSON."""
    raw = await request.content.read(MAX_MEMBER_BODY + 1)
    if len(raw) > MAX_MEMBER_BODY:
        return error(400, "too_large", f"body over {MAX_MEMBER_BODY} bytes")
    if not raw.strip():
        return {}
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        return error(400, "bad_request", "body must be JSON")

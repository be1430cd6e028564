"""The publish API for backend services: POST /api/rooms/{room}/messages with a bearer key."""

from __future__ import annotations

import hmac

from aiohttp import web

from .broker.base import BrokerUnavailable
from .chat import ChatService
from .protocol import ROOM_NAME, ROOM_RULE
from .responses import error


class PublishApi:
    def __init__(self, chat: ChatService, api_keys: tuple[tuple[str, str], ...], max_chars: int):
        self._chat = chat
        self._keys = [(name, key.encode()) for name, key in api_keys]
        self._max_chars = max_chars

    def service_for(self, authorization: str) -> str | None:
        """The service whose key this is; every key is compared, in constant time each."""
        scheme, _, presented = authorization.partition(" ")
        if scheme.lower() != "bearer" or not presented:
            return None
        # aiohttp hands non-UTF-8 header bytes in as surrogates: compare them as bytes.
        candidate = presented.encode("utf-8", "surrogateescape")
        found = None
        for name, key in self._keys:
            if hmac.compare_digest(candidate, key):
                found = name
        return found

    async def publish(self, request: web.Request) -> web.Response:
        service = self.service_for(request.headers.get("Authorization", ""))
        if service is None:
            return error(401, "unauthenticated", "a valid Authorization: Bearer <key> is required")
        room = request.match_info["room"]
        if not ROOM_NAME.fullmatch(room):
            return error(400, "bad_request", ROOM_RULE)
        try:
            body = await request.json()
        except ValueError:
            return error(400, "bad_request", "body must be JSON")
        text = body.get("message") if isinstance(body, dict) else None
        if not isinstance(text, str) or not text.strip():
            return error(400, "bad_request", "message must be a non-empty string")
        if len(text) > self._max_chars:
            return error(413, "too_large", f"message is over {self._max_chars} characters")
        try:
            message_id = await self._chat.publish_as_service(service, room, text)
        except BrokerUnavailable:
            return error(503, "unavailable", "the message broker is unavailable")
        return web.json_response({"id": message_id})

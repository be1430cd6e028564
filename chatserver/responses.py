"""The JSON error answer every HTTP route gives: {"error": code, "detail": ...}."""

from __future__ import annotations

from typing import Any

from aiohttp import web


def error(status: int, code: str, detail: str, **extra: Any) -> web.Response:
    return web.json_response({"error": code, "detail": detail, **extra}, status=status)

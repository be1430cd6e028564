"""create_app(settings): wiring only. State lives on the app under typed keys; resources
open and close in cleanup_ctx, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import redis.asyncio as aioredis
from aiohttp import web
from redis.exceptions import RedisError

from .api import PublishApi
from .auth.cognito import CognitoClient, fetch_json
from .auth.dev import DEV_CLIENT_ID, DEV_ISSUER, DevIssuer, new_private_key_pem
from .auth.tokens import TokenVerifier
from .auth.web import AuthGate, AuthRoutes, AuthService
from .broker.base import Broker
from .broker.memory import MemoryBroker
from .broker.redis import RedisBroker
from .chat import ChatService, Limits
from .config import Settings
from .hub import Hub
from .observability import Metrics, healthz_handler, metrics_handler, readyz_handler
from .ws import Closer, WsContext, WsEndpoint, close_all, instance_name, watch_expiry

log = logging.getLogger(__name__)

SETTINGS = web.AppKey("chatserver.settings", Settings)
BROKER = web.AppKey("chatserver.broker", Broker)
AUTH = web.AppKey("chatserver.auth", AuthService)
WS = web.AppKey("chatserver.ws", WsContext)
API = web.AppKey("chatserver.api", PublishApi)
AUTH_ROUTES = web.AppKey("chatserver.auth_routes", AuthRoutes)

# No inline script or style anywhere; the page talks only to its own origin.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)


def create_app(
    settings: Settings, *, broker: Broker | None = None, metrics: Metrics | None = None
) -> web.Application:
    metrics = metrics or Metrics()
    gate, endpoint = AuthGate(), WsEndpoint()
    app = web.Application(
        middlewares=[gate.middleware], client_max_size=settings.max_message_bytes
    )
    app[SETTINGS] = settings
    instance = instance_name()
    app.cleanup_ctx.append(_services(settings, broker, metrics, instance, gate, endpoint))
    app.on_shutdown.append(_close_sockets)
    app.on_response_prepare.append(_security_headers)

    app.router.add_get("/healthz", healthz_handler(instance))
    app.router.add_get("/readyz", readyz_handler(_ready))
    app.router.add_get("/metrics", metrics_handler(metrics))
    app.router.add_get("/ws", endpoint.handle)
    app.router.add_post("/api/rooms/{room}/messages", _api_publish)
    for method, path in (("POST", "/auth/login"), ("POST", "/auth/refresh"),
                         ("GET", "/auth/me"), ("POST", "/auth/logout")):
        app.router.add_route(method, path, _auth_route)
    static = Path(settings.static_dir)
    if static.is_dir():
        app.router.add_get("/", _index)
        app.router.add_static("/", static, append_version=False)
    return app


def _services(  # type: ignore[no-untyped-def]
    settings: Settings, given: Broker | None, metrics: Metrics, instance: str,
    gate: AuthGate, endpoint: WsEndpoint,
):
    async def services(app: web.Application) -> AsyncIterator[None]:
        session = aiohttp.ClientSession()
        broker = given or _make_broker(settings, instance, metrics)
        hub = Hub(position=broker.position, on_delivered=metrics.messages_out.inc)
        broker.on_room = hub.deliver_room
        broker.on_user = hub.deliver_user
        await broker.start()
        chat = ChatService(
            hub,
            broker,
            Limits(settings.max_rooms, settings.max_text_chars, settings.rate_burst),
        )
        auth = await _auth_service(settings, session, broker, metrics)
        app[BROKER] = broker
        app[AUTH] = auth
        app[WS] = WsContext(
            settings, chat, metrics, Closer(metrics), instance, asyncio.Event()
        )
        app[API] = PublishApi(chat, settings.api_keys, settings.max_text_chars)
        app[AUTH_ROUTES] = AuthRoutes(auth, chat.sign_out)
        gate.auth = auth
        endpoint.ctx = app[WS]
        await auth.verifier.prefetch()
        expiry = asyncio.create_task(watch_expiry(app[WS]), name="token-expiry")
        try:
            yield
        finally:
            expiry.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await expiry
            await broker.close()
            await session.close()

    return services


def _make_broker(settings: Settings, instance: str, metrics: Metrics) -> Broker:
    if not settings.redis_url:
        return MemoryBroker(
            history_maxlen=settings.history_maxlen,
            presence_event_limit=settings.presence_event_limit,
        )
    return RedisBroker(
        settings.redis_url,
        instance=instance,
        prefix=settings.redis_prefix,
        history_maxlen=settings.history_maxlen,
        presence_ttl=settings.presence_ttl,
        presence_event_limit=settings.presence_event_limit,
        on_reconnect=metrics.redis_reconnects.inc,
        on_listener_restart=metrics.listener_restarts.inc,
    )


async def _auth_service(
    settings: Settings, session: aiohttp.ClientSession, broker: Broker, metrics: Metrics
) -> AuthService:
    if settings.dev_auth:
        dev = DevIssuer(await _dev_key(settings), ttl=settings.dev_token_ttl)

        async def local_jwks() -> dict[str, object]:
            return dev.jwks()

        def dev_verifier(uses: set[str]) -> TokenVerifier:
            return TokenVerifier(issuers=[DEV_ISSUER], client_id=DEV_CLIENT_ID, token_uses=uses,
                                 fetch_jwks=local_jwks, leeway=settings.token_leeway)

        return AuthService(settings, dev_verifier({"access"}), broker, metrics, dev=dev,
                           refresh_verifier=dev_verifier({"refresh"}))
    issuer = settings.cognito_issuer
    region_pool = issuer.rpartition("/")[2]
    jwks_url = settings.cognito_jwks_url or f"{issuer}/.well-known/jwks.json"

    async def cognito_jwks() -> dict[str, object]:
        document: dict[str, object] = await fetch_json(session, jwks_url)
        return document

    assert settings.cognito_client_id is not None
    verifier = TokenVerifier(
        issuers=[issuer, f"https://issuer.cognito-idp.{settings.aws_region}.amazonaws.com/{region_pool}"],
        client_id=settings.cognito_client_id,
        token_uses={settings.token_use},
        fetch_jwks=cognito_jwks,
        leeway=settings.token_leeway,
    )
    cognito = CognitoClient(
        session,
        region=settings.aws_region,
        client_id=settings.cognito_client_id,
        client_secret=settings.cognito_client_secret,
        endpoint=settings.cognito_endpoint,
    )
    return AuthService(settings, verifier, broker, metrics, cognito=cognito)


async def _dev_key(settings: Settings) -> bytes:
    """Every worker and replica must sign with one key: file, else Redis, else a new one."""
    if settings.dev_key_file:
        return Path(settings.dev_key_file).read_bytes()  # noqa: ASYNC240 - one small file, once at start-up
    if not settings.redis_url:
        return new_private_key_pem()
    client = aioredis.Redis.from_url(settings.redis_url, socket_connect_timeout=2)
    key = f"{settings.redis_prefix}devkey"
    try:
        for attempt in range(20):
            try:
                await client.set(key, new_private_key_pem(), nx=True)
                stored = await client.get(key)
                if isinstance(stored, bytes):
                    return stored
            except (RedisError, OSError) as exc:
                log.warning("waiting for redis to share the dev key (%s)", type(exc).__name__)
            await asyncio.sleep(min(0.1 * 2**attempt, 2.0))
        raise RuntimeError("redis unreachable: cannot share the dev sign-in key between workers")
    finally:
        await client.aclose()


# ------------------------------------------------------------------ handlers


async def _api_publish(request: web.Request) -> web.StreamResponse:
    return await request.app[API].publish(request)


async def _auth_route(request: web.Request) -> web.StreamResponse:
    routes = request.app[AUTH_ROUTES]
    handler = {
        "/auth/login": routes.login,
        "/auth/refresh": routes.refresh,
        "/auth/me": routes.me,
        "/auth/logout": routes.logout,
    }[request.path]
    return await handler(request)


async def _index(request: web.Request) -> web.StreamResponse:
    return web.FileResponse(Path(request.app[SETTINGS].static_dir) / "index.html")


def _ready(app: web.Application) -> tuple[bool, str]:
    if WS not in app or app[WS].draining.is_set():
        return False, "draining"
    if not app[BROKER].connected:
        return False, "broker disconnected"
    return True, "ok"


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    if isinstance(response, web.WebSocketResponse):
        return  # a 101 needs none, and its headers live as long as the socket
    response.headers["Server"] = "chatserver"  # no versions for scanners to match
    response.headers.setdefault("Content-Security-Policy", CSP)
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "no-referrer")
    if request.method == "GET" and response.content_type in (
        "text/html", "text/javascript", "application/javascript", "text/css"
    ):
        response.headers.setdefault("Cache-Control", "no-cache")  # revalidate (ETag)


async def _close_sockets(app: web.Application) -> None:
    ctx = app.get(WS)
    if ctx is not None:
        ctx.draining.set()
        await close_all(ctx, 1001, "server shutting down", ctx.settings.grace)

"""create_app(settings): the one place the server is wired. Every part is built here,
from settings, with what it needs passed in; cleanup_ctx only starts and stops them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
from aiohttp import web
from redis.exceptions import RedisError

from .admission import Admission, LoopLag
from .api import ApiRoutes
from .auth.challenge_store import ChallengeStore, MemoryChallengeStore, RedisChallengeStore
from .auth.cognito import CognitoClient, fetch_json
from .auth.denylist import Denylist, MemoryDenylist, RedisDenylist
from .auth.dev import DEV_CLIENT_ID, DEV_ISSUER, DevIssuer, new_private_key_pem
from .auth.gate import AuthGate
from .auth.routes import AuthRoutes, AuthService
from .auth.tokens import TokenVerifier
from .broker.base import Broker
from .broker.memory import MemoryBroker
from .broker.redis import RedisBroker
from .broker.redis.client import RedisClient, command_client
from .chat import ChatService, Limits
from .config import Settings
from .counters import HitCounter, MemoryHitCounter, RedisHitCounter
from .hub import Hub
from .memberships import Memberships, MemoryMemberships, RedisMemberships
from .observability import Metrics, healthz_handler, metrics_handler, readyz_handler
from .permissions import Gatekeeper, load_rules
from .ws import WsEndpoint, instance_name

log = logging.getLogger(__name__)

CHAT = web.AppKey("chatserver.chat", ChatService)
BROKER = web.AppKey("chatserver.broker", Broker)
ENDPOINT = web.AppKey("chatserver.ws", WsEndpoint)

# No inline script or style anywhere; the page talks only to its own origin.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)


async def create_app(
    settings: Settings, *, broker: Broker | None = None, metrics: Metrics | None = None
) -> web.Application:
    """The whole server. Async because two parts need the loop to be built: the HTTP
    client session, and the dev signing key that workers share through Redis."""
    metrics = metrics or Metrics()
    instance = instance_name()
    # Commands outside the broker: sign-in counters, memberships, the shared dev key.
    store = command_client(settings.redis_url) if settings.redis_url else None
    session = aiohttp.ClientSession()
    try:
        auth = await _auth_service(settings, session, store, metrics)
    except BaseException:
        await session.close()
        if store is not None:
            await store.aclose()
        raise
    broker = broker or _make_broker(settings, instance, metrics)
    hub = Hub(position=broker.position, on_delivered=metrics.messages_out.inc)
    limits = Limits(max_rooms=settings.max_rooms, max_text_chars=settings.max_text_chars,
                    flood_strikes=settings.rate_burst, user_rate=settings.per_user_rate,
                    user_burst=settings.per_user_burst,
                    direct_needs_shared_room=settings.direct_messages == "shared-room",
                    user_rooms_per_hour=settings.user_rooms_per_hour,
                    rooms_per_hour=settings.rooms_per_hour)
    memberships: Memberships = (
        RedisMemberships(store, settings.redis_prefix) if store is not None
        else MemoryMemberships())
    gate = Gatekeeper(load_rules(settings.room_rules, settings.room_rules_file), memberships)
    chat = ChatService(hub, broker, limits, gate, auth.hits)
    admission = Admission(settings.max_handshakes, metrics.handshakes_shed.inc,
                          max_lag=settings.shed_lag, lag=LoopLag(metrics.loop_lag.observe))
    endpoint = WsEndpoint(settings=settings, chat=chat, metrics=metrics, instance=instance,
                          admission=admission)
    auth_gate = AuthGate(settings, auth.verifier, metrics, admission)

    app = web.Application(middlewares=[auth_gate.middleware],
                          client_max_size=settings.max_message_bytes)
    app[CHAT], app[BROKER], app[ENDPOINT] = chat, broker, endpoint

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        await broker.start(chat)
        await auth.denylist.start()
        await auth.verifier.prefetch()
        admission.lag.start()
        tasks = [asyncio.create_task(endpoint.watch_expiry(), name="token-expiry"),
                 asyncio.create_task(endpoint.keep_alive(), name="heartbeat"),
                 asyncio.create_task(auth.verifier.keep_warm(), name="jwks-warm")]
        try:
            yield
        finally:
            admission.lag.stop()
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await chat.control.close()
            await auth.denylist.close()
            await broker.close()
            await session.close()
            if store is not None:
                await store.aclose()

    async def drain(app: web.Application) -> None:
        await endpoint.drain()

    def readiness() -> tuple[bool, str]:
        if endpoint.draining.is_set():
            return False, "draining"
        if not broker.connected:
            return False, "broker disconnected"
        if not auth.verifier.ready:
            return False, "auth keys unavailable"
        return True, "ok"

    app.cleanup_ctx.append(lifecycle)
    app.on_shutdown.append(drain)
    app.on_response_prepare.append(_security_headers)
    router = app.router
    router.add_get("/healthz", healthz_handler(instance))
    router.add_get("/readyz", readyz_handler(readiness))
    router.add_get("/metrics", metrics_handler(metrics, settings.metrics_token))
    router.add_get("/ws", endpoint.handle)
    ApiRoutes(chat, settings.api_keys, settings.max_text_chars).add_to(router)
    AuthRoutes(auth, chat.sign_out).add_to(router)
    _add_static(router, Path(settings.static_dir))
    return app


def _add_static(router: web.UrlDispatcher, static: Path) -> None:
    if not static.is_dir():
        return

    async def index(request: web.Request) -> web.StreamResponse:
        return web.FileResponse(static / "index.html")

    router.add_get("/", index)
    router.add_static("/", static, append_version=False)


def _make_broker(settings: Settings, instance: str, metrics: Metrics) -> Broker:
    if not settings.redis_url:
        return MemoryBroker(
            history_maxlen=settings.history_maxlen,
            room_ttl=settings.room_ttl,
            presence_event_limit=settings.presence_event_limit,
        )
    return RedisBroker(
        settings.redis_url,
        instance=instance,
        prefix=settings.redis_prefix,
        history_maxlen=settings.history_maxlen,
        room_ttl=settings.room_ttl,
        presence_ttl=settings.presence_ttl,
        presence_event_limit=settings.presence_event_limit,
        on_reconnect=metrics.redis_reconnects.inc,
        on_listener_restart=metrics.listener_restarts.inc,
    )


async def _auth_service(
    settings: Settings,
    session: aiohttp.ClientSession,
    store: RedisClient | None,
    metrics: Metrics,
) -> AuthService:
    hits: HitCounter = (
        RedisHitCounter(store, settings.redis_prefix) if store is not None else MemoryHitCounter()
    )
    denylist: Denylist = (
        RedisDenylist(store, settings.redis_url, settings.redis_prefix)
        if store is not None and settings.redis_url else MemoryDenylist())
    if settings.dev_auth:
        dev = DevIssuer(await _dev_key(settings, store), ttl=settings.dev_token_ttl)

        async def local_jwks() -> dict[str, object]:
            return dev.jwks()

        def dev_verifier(uses: set[str]) -> TokenVerifier:
            return TokenVerifier(issuers=[DEV_ISSUER], client_id=DEV_CLIENT_ID, token_uses=uses,
                                 fetch_jwks=local_jwks, leeway=settings.token_leeway,
                                 refuses=denylist.refuses)

        return AuthService(settings, dev_verifier({"access"}), hits, metrics, denylist, dev=dev,
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
        refuses=denylist.refuses,
    )
    cognito = CognitoClient(
        session,
        region=settings.aws_region,
        client_id=settings.cognito_client_id,
        client_secret=settings.cognito_client_secret,
        endpoint=settings.cognito_endpoint,
    )
    challenges: ChallengeStore = (
        RedisChallengeStore(store, settings.redis_prefix) if store is not None
        else MemoryChallengeStore())
    return AuthService(settings, verifier, hits, metrics, denylist, cognito=cognito,
                       challenges=challenges)


async def _dev_key(settings: Settings, store: RedisClient | None) -> bytes:
    """Every worker and replica must sign with one key: file, else Redis, else a new one."""
    if settings.dev_key_file:
        return Path(settings.dev_key_file).read_bytes()  # noqa: ASYNC240 - one small file, once at start-up
    if store is None:
        return new_private_key_pem()
    key = f"{settings.redis_prefix}devkey"
    for attempt in range(20):
        try:
            await store.set(key, new_private_key_pem(), nx=True)
            stored = await store.get(key)
            if isinstance(stored, bytes):
                return stored
        except (RedisError, OSError) as exc:
            log.warning("waiting for redis to share the dev key (%s)", type(exc).__name__)
        await asyncio.sleep(min(0.1 * 2**attempt, 2.0))
    raise RuntimeError("redis unreachable: cannot share the dev sign-in key between workers")


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

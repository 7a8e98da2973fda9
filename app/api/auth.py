"""Who is calling. Every `/v1` request must carry `Authorization: Bearer <key>` (keys: `genq keys
create`, app/tenancy/keys.py); anything else is 401 problem+json. The health endpoints (/healthz, /readyz,
/metrics) and /openapi.json are open.

For authors of new endpoints:

- Register the blueprint under `/v1`: `install(app)` checks the key (and the key's request rate)
  in a `before_request` hook for every path under `/v1/`, so the view runs only for a live key.
  A view outside `/v1` that needs a key is decorated with `@require_api_key`.
- Scope every read and write to `current_owner()` (the key's id): filter queries with it and
  store it as the owner of what you create. Another owner's object must be indistinguishable from
  a missing one: answer 404, never 403. `current_key()` gives the key's quotas and webhook secret.
"""
from __future__ import annotations

import functools
import logging
import threading
import time

from flask import Flask, current_app, g, request
from redis.exceptions import RedisError
from sqlalchemy.exc import SQLAlchemyError

from app.api.services import services
from app.infra.problems import DATABASE, OUTAGE_RETRY_AFTER_SECONDS, Problem, Unavailable, outage
from app.tenancy import keys
from app.tenancy.keys import KeyIdentity
from app.tenancy.rate_limit import RateLimiter

log = logging.getLogger(__name__)

PROTECTED_PREFIX = "/v1/"
_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="genq"'}

# Views whose own write re-checks that the key is live (`store.create_job(..., live_key=True)`, in
# the same statement as the insert): for them a recently seen key is taken from a per-process cache
# instead of a SELECT, and a key revoked meanwhile is still refused, by that write. Every other view
# looks the key up in the database on each request.
CACHED_KEY_ENDPOINTS = frozenset({"jobs.create_job"})
KEY_CACHE_SECONDS = 60.0
KEY_CACHE_SIZE = 4096


class KeyCache:
    """key hash -> (KeyIdentity, expiry); thread-safe; cleared whole when full (keys are few)."""

    def __init__(self, ttl_seconds: float = KEY_CACHE_SECONDS, size: int = KEY_CACHE_SIZE):
        self.ttl_seconds = ttl_seconds
        self.size = size
        self._entries: dict[str, tuple[KeyIdentity, float]] = {}
        self._lock = threading.Lock()

    def get(self, digest: str) -> KeyIdentity | None:
        entry = self._entries.get(digest)
        if entry is None or entry[1] < time.monotonic():
            return None
        return entry[0]

    def put(self, digest: str, key: KeyIdentity) -> None:
        with self._lock:
            if len(self._entries) >= self.size:
                self._entries.clear()
            self._entries[digest] = (key, time.monotonic() + self.ttl_seconds)

    def forget(self, key_id: str) -> None:
        with self._lock:
            for digest in [d for d, (key, _) in self._entries.items() if key.id == key_id]:
                del self._entries[digest]


def install(app: Flask) -> None:
    svc = app.extensions["genq"]
    app.extensions["genq_rate_limiter"] = RateLimiter(svc.redis, svc.settings.key_prefix)
    app.extensions["genq_key_cache"] = KeyCache()

    @app.before_request
    def _authenticate_v1():
        if request.path.startswith(PROTECTED_PREFIX) or request.path == PROTECTED_PREFIX.rstrip("/"):
            _authenticate()


def _authenticate() -> KeyIdentity:
    if "genq_key" in g:
        return g.genq_key
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if not header:
        raise Problem(401, "send an API key: 'Authorization: Bearer <key>' (create one with `genq keys create`)",
                      title="Missing API key", type="unauthorized", headers=_CHALLENGE)
    if scheme.lower() != "bearer" or not token.strip():
        raise Problem(401, "the Authorization header must be 'Bearer <key>'", title="Invalid API key",
                      type="unauthorized", headers=_CHALLENGE)
    svc = services()
    token = token.strip()
    cache: KeyCache = current_app.extensions["genq_key_cache"]
    cacheable = request.endpoint in CACHED_KEY_ENDPOINTS
    digest = keys.hash_key(token) if cacheable else None
    key = cache.get(digest) if cacheable else None
    if key is not None:
        g.genq_key = key
        _check_rate(key)
        return key
    try:
        with svc.sessions() as session:
            key = keys.authenticate(session, token)
    except SQLAlchemyError as exc:
        if outage(exc) is None:
            raise   # a bug: the generic 500
        log.warning("cannot check an API key: the database is unreachable (%s: %s)", type(exc).__name__,
                    str(exc).splitlines()[0] if str(exc) else "")
        raise Unavailable(DATABASE, "the database is unavailable, so API keys cannot be checked right now; retry in "
                          f"{OUTAGE_RETRY_AFTER_SECONDS} s") from None
    if key is None:
        raise _invalid_key()
    if cacheable:
        cache.put(digest, key)
    g.genq_key = key
    _check_rate(key)
    return key


def revoked_meanwhile(key: KeyIdentity) -> Problem:
    """For a view whose write found the (cached) key revoked: forget it, and the 401 to raise."""
    current_app.extensions["genq_key_cache"].forget(key.id)
    return _invalid_key()


def _invalid_key() -> Problem:
    # One answer for unknown and revoked keys: which keys exist is not disclosed.
    return Problem(401, "the API key is unknown or revoked", title="Invalid API key", type="unauthorized",
                   headers=_CHALLENGE)


def _check_rate(key: KeyIdentity) -> None:
    limit = key.rate_limit_per_minute or services().settings.rate_limit_per_minute
    try:
        decision = current_app.extensions["genq_rate_limiter"].hit(key.id, limit)
    except RedisError:
        # Fail open: with Redis down the API still answers what it can (polls from the database).
        log.warning("rate limiter unavailable (Redis); request allowed", exc_info=True)
        return
    if not decision.allowed:
        raise Problem(429, f"this key may make {limit} requests per minute; retry in {decision.retry_after_seconds} s",
                      title="Too many requests", type="rate-limited",
                      headers={"Retry-After": str(decision.retry_after_seconds)})


def charge_request(key: KeyIdentity) -> None:
    """Count one request against `key`'s rate limit (429 problem when over it), for views that
    authenticate another way (the web console's session, app/api/console/)."""
    _check_rate(key)


def require_api_key(view):
    """For views outside /v1: authenticate (and rate-limit) before the view runs."""
    @functools.wraps(view)
    def wrapper(*args, **kwargs):
        _authenticate()
        return view(*args, **kwargs)
    return wrapper


def current_key() -> KeyIdentity:
    """The calling key (its quotas, its webhook secret); 401 if the request has none."""
    return _authenticate()


def current_owner() -> str:
    """The owner every lookup and every new object of this request is scoped to: the key's id."""
    return current_key().id

"""Webhook callbacks as the Standard Webhooks specification defines them: event names, secrets,
signing, verification, the retry schedule, and which targets genq may call.

A delivery carries three headers: `webhook-id` (the event's id, the same on every retry),
`webhook-timestamp` (Unix seconds of this attempt) and `webhook-signature`
(`v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`, keyed by the base64-decoded part of the
`whsec_...` secret). Receivers check a delivery with `verify(headers, body, secret)`.

No Flask and no Celery here: the API, the worker and receivers' own code all import it.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import random
import secrets
import socket
import time
from typing import Any, Mapping
from urllib.parse import urlsplit

SECRET_PREFIX = "whsec_"
MIN_SECRET_BYTES = 24
TOLERANCE_SECONDS = 5 * 60           # receivers reject deliveries signed longer ago (or ahead) than this
OUTPUT_INTERVAL_SECONDS = 0.5        # at most one job.output event per job per this interval
MAX_URL_LENGTH = 2048

# webhook_events_filter value -> event type
EVENT_TYPES = {"start": "job.started", "output": "job.output", "completed": "job.completed"}
DEFAULT_EVENTS_FILTER = ("completed",)
# Event types a job has at most once (a unique index on (job_id, type) enforces it).
ONCE_PER_JOB = ("job.started", "job.completed")

# Delay before each attempt, in seconds: at once, 5 s, 30 s, 2 min, 10 min, 30 min, 2 h, 6 h.
DEFAULT_RETRY_SCHEDULE = (0.0, 5.0, 30.0, 120.0, 600.0, 1800.0, 7200.0, 21600.0)

TASK_DELIVER_WEBHOOK = "genq.deliver_webhook"


class WebhookVerificationError(Exception):
    """A delivery whose headers, timestamp or signature do not check out."""


class WebhookTargetError(ValueError):
    """A webhook URL genq will not call (bad form, or a private/reserved address)."""


# -- secrets and signatures ------------------------------------------------------------------------

def generate_secret(nbytes: int = 32) -> str:
    """A new `whsec_<base64>` secret."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(max(nbytes, MIN_SECRET_BYTES))).decode()


def secret_key(secret: str) -> bytes:
    """The HMAC key of a `whsec_...` secret (its base64-decoded part)."""
    encoded = secret[len(SECRET_PREFIX):] if secret.startswith(SECRET_PREFIX) else secret
    try:
        key = base64.b64decode(encoded, validate=True)
    except ValueError:
        raise ValueError("a webhook secret is 'whsec_' followed by base64") from None
    if len(key) < MIN_SECRET_BYTES:
        raise ValueError(f"a webhook secret must hold at least {MIN_SECRET_BYTES} random bytes")
    return key


def sign(secret: str, msg_id: str, timestamp: int, body: bytes | str) -> str:
    """The `webhook-signature` value: `v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`."""
    if isinstance(body, str):
        body = body.encode()
    signed = f"{msg_id}.{int(timestamp)}.".encode() + body
    digest = hmac.new(secret_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def signed_headers(secret: str, msg_id: str, body: bytes, timestamp: int | None = None) -> dict[str, str]:
    timestamp = int(time.time()) if timestamp is None else int(timestamp)
    return {"webhook-id": msg_id, "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(secret, msg_id, timestamp, body)}


def verify(headers: Mapping[str, str], body: bytes | str, secret: str, *, tolerance: float = TOLERANCE_SECONDS,
           now: float | None = None) -> Any:
    """Check a delivery; returns its decoded JSON payload or raises `WebhookVerificationError`.

    `headers` may be any mapping (names are matched case-insensitively). Several space-separated
    signatures are accepted (secret rotation); one valid `v1` signature suffices.
    """
    lowered = {k.lower(): v for k, v in headers.items()}
    msg_id, raw_timestamp, signatures = (lowered.get(n) for n in
                                         ("webhook-id", "webhook-timestamp", "webhook-signature"))
    if not msg_id or not raw_timestamp or not signatures:
        raise WebhookVerificationError("missing webhook-id, webhook-timestamp or webhook-signature")
    try:
        timestamp = int(raw_timestamp)
    except ValueError:
        raise WebhookVerificationError("webhook-timestamp is not an integer") from None
    now = time.time() if now is None else now
    if timestamp < now - tolerance:
        raise WebhookVerificationError("webhook-timestamp is too old")
    if timestamp > now + tolerance:
        raise WebhookVerificationError("webhook-timestamp is too far in the future")
    expected = sign(secret, msg_id, timestamp, body).encode()
    for candidate in signatures.split():
        if candidate.startswith("v1,") and hmac.compare_digest(candidate.encode(), expected):
            return json.loads(body)
    raise WebhookVerificationError("no matching signature")


def webhook_secret_for(job, settings, session=None) -> str | None:
    """The secret a job's deliveries are signed with: the webhook secret of the API key that owns
    the job (`genq keys create` shows it), else the deployment's `GENQ_WEBHOOK_SECRET` (jobs
    without an owner)."""
    if job is not None and job.owner is not None and session is not None:
        from app.keys import webhook_secret_of_owner

        secret = webhook_secret_of_owner(session, job.owner)
        if secret:
            return secret
    return settings.webhook_secret


# -- events ------------------------------------------------------------------------------------------

def events_filter(names) -> list[str]:
    """A normalised `webhook_events_filter`: known names, each once, in start/output/completed order."""
    names = DEFAULT_EVENTS_FILTER if names is None else names
    unknown = [n for n in names if n not in EVENT_TYPES]
    if unknown:
        raise ValueError(f"unknown webhook events {unknown}; use any of {list(EVENT_TYPES)}")
    return [n for n in EVENT_TYPES if n in names]


def payload_body(event_type: str, timestamp: str, data: dict[str, Any]) -> str:
    """The exact JSON body of an event (stored, so every retry sends the same bytes)."""
    return json.dumps({"type": event_type, "timestamp": timestamp, "data": data}, separators=(",", ":"),
                      ensure_ascii=False)


def retry_delay(schedule, attempt: int, jitter: float, retry_after: float | None = None) -> float | None:
    """Seconds to wait before attempt `attempt + 1` after attempt `attempt` failed; None when the
    schedule is spent. Jitter spreads each delay over ±`jitter` of itself; a receiver's
    `Retry-After` is honoured (never waiting less), up to the schedule's longest delay."""
    if attempt >= len(schedule):
        return None
    delay = float(schedule[attempt])
    if jitter and delay > 0:
        delay *= random.uniform(1.0 - jitter, 1.0 + jitter)
    if retry_after is not None:
        delay = max(delay, min(retry_after, max(schedule)))
    return delay


# -- targets (SSRF) ----------------------------------------------------------------------------------

def check_url_form(url: str) -> str:
    """Syntax only (no DNS): an absolute http(s) URL with a host and no credentials."""
    if len(url) > MAX_URL_LENGTH:
        raise WebhookTargetError(f"the webhook URL is longer than {MAX_URL_LENGTH} characters")
    try:
        parts = urlsplit(url)
        parts.port
    except ValueError as exc:
        raise WebhookTargetError(f"the webhook URL is malformed: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise WebhookTargetError("the webhook URL must start with https:// or http://")
    if not parts.hostname:
        raise WebhookTargetError("the webhook URL has no host")
    if parts.username is not None or parts.password is not None:
        raise WebhookTargetError("the webhook URL must not contain credentials")
    if any(c.isspace() for c in url):
        raise WebhookTargetError("the webhook URL must not contain whitespace")
    return url


def refused_reason(address: str) -> str | None:
    """Why genq will not call `address`, or None when it is a public unicast address."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    for kind in ("loopback", "link_local", "multicast", "unspecified", "reserved", "private"):
        if getattr(ip, f"is_{kind}"):
            return kind.replace("_", "-")
    if not ip.is_global:
        return "non-global"
    return None


def resolve_target(url: str, allow_private: bool) -> tuple[str, int, list[str]]:
    """(host, port, addresses) for a webhook URL, resolved once. Raises `WebhookTargetError` when
    it does not resolve or (unless `allow_private`) any address is loopback, private, link-local,
    multicast or reserved: callers connect to one of the returned addresses, so a name that
    resolves differently later (DNS rebinding) cannot redirect the request."""
    parts = urlsplit(check_url_form(url))
    host = parts.hostname
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise WebhookTargetError(f"the webhook host {host!r} does not resolve: {exc}") from None
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    if not addresses:
        raise WebhookTargetError(f"the webhook host {host!r} does not resolve")
    if not allow_private:
        for address in addresses:
            reason = refused_reason(address)
            if reason is not None:
                raise WebhookTargetError(
                    f"the webhook host {host!r} resolves to {address}, a {reason} address; webhooks may "
                    "only call public addresses (GENQ_WEBHOOK_ALLOW_PRIVATE=1 allows private ones)")
    return host, port, addresses


# -- `genq up` ---------------------------------------------------------------------------------------

def for_local_development(settings, environ: Mapping[str, str]):
    """`genq up`'s webhook defaults: private targets allowed (receivers on this machine) unless the
    environment sets GENQ_WEBHOOK_ALLOW_PRIVATE itself, and, without GENQ_WEBHOOK_SECRET, a secret
    made once and kept in `<GENQ_HOME>/webhook_secret`. Returns (settings, secret file or None)."""
    import os
    from pathlib import Path

    if "GENQ_WEBHOOK_ALLOW_PRIVATE" not in environ:
        settings = settings.with_(webhook_allow_private=True)
    if settings.webhook_secret:
        return settings, None
    path = Path(settings.home) / "webhook_secret"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as file:
            file.write(generate_secret() + "\n")
    return settings.with_(webhook_secret=path.read_text().strip()), path

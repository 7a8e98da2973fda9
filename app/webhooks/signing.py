"""Signing and verifying deliveries as the Standard Webhooks specification defines them.

A delivery carries three headers: `webhook-id` (the event's id, the same on every retry),
`webhook-timestamp` (Unix seconds of this attempt) and `webhook-signature`
(`v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`, keyed by the base64-decoded part of the
`whsec_...` secret). Receivers check a delivery with `verify(headers, body, secret)`.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any, Mapping

from app.infra.webhook_secrets import secret_key

TOLERANCE_SECONDS = 5 * 60           # receivers reject deliveries signed longer ago (or ahead) than this


class WebhookVerificationError(Exception):
    """A delivery whose headers, timestamp or signature do not check out."""


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

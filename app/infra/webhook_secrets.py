"""Standard Webhooks secrets (`whsec_` + base64 of random bytes): made for every API key and for
`genq up`, checked by the settings, used as HMAC keys by the signer.
"""
from __future__ import annotations

import base64
import secrets

SECRET_PREFIX = "whsec_"
MIN_SECRET_BYTES = 24


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

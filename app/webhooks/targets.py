"""Which URLs genq may call back (SSRF): an absolute http(s) URL whose host resolves to public
addresses only, unless private ones are allowed (development).
"""
from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

MAX_URL_LENGTH = 2048


class WebhookTargetError(ValueError):
    """A webhook URL genq will not call (bad form, or a private/reserved address)."""


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

"""What protects the console's pages: response headers (CSP and friends) and the CSRF check.

CSRF: every state-changing request (sign-in, sign-out, submit, cancel) is a POST that must carry
the session's CSRF token (form field `csrf_token`, or header `X-CSRF-Token`); before sign-in there
is no session, so the sign-in form's token is double-submitted (a random value in its own
SameSite=Strict cookie and in the form). A POST whose `Origin` is another site is refused as well.
The session cookie is SameSite=Strict on top of that.
"""
from __future__ import annotations

import hmac
from urllib.parse import urlsplit

from flask import Response, request

from app.infra.problems import Problem

CSRF_FIELD = "csrf_token"
CSRF_HEADER = "X-CSRF-Token"

CONTENT_SECURITY_POLICY = "; ".join((
    "default-src 'none'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self'",
    "connect-src 'self'",
    "form-action 'self'",
    "base-uri 'none'",
    "frame-ancestors 'none'",
))

SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Frame-Options": "DENY",                      # frame-ancestors for browsers without CSP 2
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}


def add_security_headers(response: Response) -> Response:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    if response.mimetype == "text/html" or response.mimetype == "application/json":
        response.headers["Cache-Control"] = "no-store"   # job contents stay out of caches
    return response


def check_csrf(expected: str | None) -> None:
    """Refuse (403) a POST from another origin or without the expected token."""
    origin = request.headers.get("Origin")
    if origin is not None and not same_origin(origin):
        raise _forbidden("this request came from another site")
    sent = request.form.get(CSRF_FIELD) or request.headers.get(CSRF_HEADER) or ""
    if not expected or not hmac.compare_digest(sent.encode(), expected.encode()):
        raise _forbidden("the form's security token is missing or out of date: reload the page and try again")


def same_origin(url: str) -> bool:
    here = urlsplit(request.host_url)
    there = urlsplit(url)
    return (there.scheme, there.netloc) == (here.scheme, here.netloc)


def _forbidden(detail: str) -> Problem:
    return Problem(403, detail, title="Request refused", type="csrf")

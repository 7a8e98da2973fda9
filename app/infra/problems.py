"""RFC 9457 problem details as an exception, Flask-free: domain code raises `Problem` for what it
refuses, and the API renders it as `application/problem+json` (app/api/problems.py).
"""
from __future__ import annotations

from typing import Any


class Problem(Exception):
    """Raise anywhere in a request to answer with a problem document."""

    def __init__(self, status: int, detail: str, *, title: str | None = None, type: str | None = None,
                 headers: dict[str, str] | None = None, **extensions: Any):
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.title = title
        self.type = type
        self.headers = headers or {}
        self.extensions = extensions

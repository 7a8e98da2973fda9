"""Reading request bodies, headers and query parameters, with problem+json on anything malformed."""
from __future__ import annotations

import base64
import binascii
import json

from flask import request

from app.infra.problems import Problem
from app.infra.settings import MAX_WAIT_SECONDS
from app.jobs.event_log import EventId

MAX_JSON_DEPTH = 32


def json_object_body() -> dict:
    mimetype = request.mimetype
    if mimetype and mimetype != "application/json" and not mimetype.endswith("+json"):
        raise Problem(415, f"send the body as JSON with 'Content-Type: application/json' (got {mimetype!r})",
                      title="Unsupported body type")
    raw = request.get_data(cache=False)
    if not raw.strip():
        raise Problem(400, "the request body is empty: send a JSON object", title="Invalid JSON",
                      type="invalid-json")
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except UnicodeDecodeError:
        raise Problem(400, "the request body is not UTF-8 text", title="Invalid JSON", type="invalid-json") from None
    except RecursionError:
        raise _too_deep() from None
    except ValueError as exc:
        raise Problem(400, f"the request body is not valid JSON: {exc}", title="Invalid JSON",
                      type="invalid-json") from None
    if _depth(body) > MAX_JSON_DEPTH:
        raise _too_deep()
    if not isinstance(body, dict):
        raise Problem(422, f"the request body must be a JSON object, got a JSON {type(body).__name__}",
                      title="Invalid request body", type="validation-error")
    return body


def _too_deep() -> Problem:
    return Problem(400, f"the request body nests deeper than {MAX_JSON_DEPTH} levels", title="Invalid JSON",
                   type="invalid-json")


def _reject_constant(name: str):
    raise ValueError(f"{name} is not JSON (RFC 8259 has no NaN or Infinity)")


def _depth(value) -> int:
    """Nesting depth of a parsed JSON value, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            if depth <= MAX_JSON_DEPTH:
                stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def preferred_wait() -> int | None:
    """Seconds from `Prefer: wait=N` (RFC 7240), capped at MAX_WAIT_SECONDS; None without one.

    A malformed preference is ignored, as RFC 7240 asks.
    """
    for preference in request.headers.getlist("Prefer"):
        for item in preference.split(","):
            token = item.split(";", 1)[0].strip()
            name, _, value = token.partition("=")
            if name.strip().lower() != "wait":
                continue
            try:
                seconds = int(value.strip().strip('"'))
            except ValueError:
                return None
            return max(0, min(seconds, MAX_WAIT_SECONDS))
    return None


def last_event_id() -> EventId | None:
    raw = request.headers.get("Last-Event-ID") or request.args.get("last_event_id")
    if raw is None or raw.strip() == "":
        return None
    try:
        return EventId.parse(raw)
    except ValueError as exc:
        raise Problem(400, f"invalid Last-Event-ID: {exc}", title="Invalid event id") from None


def int_arg(name: str, default: int, low: int, high: int) -> int:
    raw = request.args.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise Problem(400, f"query parameter {name!r} must be an integer, got {raw!r}") from None
    if not low <= value <= high:
        raise Problem(400, f"query parameter {name!r} must be between {low} and {high}, got {value}")
    return value


def encode_cursor(job_id: str) -> str:
    return base64.urlsafe_b64encode(f"j:{job_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> str:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        text = ""
    if not text.startswith("j:") or not text[2:].isalnum():
        raise Problem(400, "invalid cursor: pass back the next_cursor of a previous page unchanged",
                      title="Invalid cursor")
    return text[2:]

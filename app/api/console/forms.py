"""The console's submit form -> the body of `POST /v1/jobs` (then validated by the same `JobCreate`).

An empty field is left out, so the API's defaults apply. What cannot even become a body (a number
that is not one, JSON that does not parse) is a `FormError` naming the field.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

INT_FIELDS = ("max_tokens", "min_tokens", "top_k", "seed", "priority")
FLOAT_FIELDS = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty")
FORMATS = ("text", "json_object", "json_schema", "regex", "choice", "grammar")
WEBHOOK_EVENTS = ("start", "output", "completed")
SERVICE_TIERS = ("default", "flex")


class FormError(ValueError):
    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


def job_body(form: Mapping[str, str], events: list[str]) -> dict[str, Any]:
    """`form`: the submitted fields (name -> text); `events`: the checked webhook events."""
    body: dict[str, Any] = {}
    if form.get("kind", "prompt") == "chat":
        body["messages"] = _json(form, "messages", list, "a JSON array of {\"role\", \"content\"} objects")
    else:
        body["prompt"] = form.get("prompt", "")
    for name in INT_FIELDS:
        if (value := _given(form, name)) is not None:
            body[name] = _number(name, value, int)
    for name in FLOAT_FIELDS:
        if (value := _given(form, name)) is not None:
            body[name] = _number(name, value, float)
    if stop := [line for line in form.get("stop", "").splitlines() if line]:
        body["stop"] = stop
    if form.get("ignore_eos"):
        body["ignore_eos"] = True
    if (tier := form.get("service_tier", "default")) != "default":
        body["service_tier"] = tier
    if _given(form, "metadata") is not None:
        body["metadata"] = _json(form, "metadata", dict, "a JSON object")
    if (webhook := _given(form, "webhook")) is not None:
        body["webhook"] = webhook
        if events:
            body["webhook_events_filter"] = list(events)
    if (response_format := _response_format(form)) is not None:
        body["response_format"] = response_format
    return body


def _response_format(form: Mapping[str, str]) -> dict[str, Any] | None:
    kind = form.get("format", "text")
    constraint = form.get("constraint", "")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        return {"type": "json_schema", "json_schema": {
            "name": "console", "schema": _json(form, "constraint", dict, "a JSON Schema (a JSON object)"),
            "strict": True}}
    if kind == "regex":
        return {"type": "regex", "pattern": constraint}
    if kind == "choice":
        return {"type": "choice", "choices": [line for line in constraint.splitlines() if line]}
    if kind == "grammar":
        return {"type": "grammar", "grammar": constraint}
    raise FormError("format", f"must be one of {', '.join(FORMATS)}")


def _given(form: Mapping[str, str], name: str) -> str | None:
    value = form.get(name, "").strip()
    return value or None


def _number(name: str, text: str, kind: type) -> int | float:
    try:
        return kind(text)
    except ValueError:
        raise FormError(name, "must be an integer" if kind is int else "must be a number") from None


def _json(form: Mapping[str, str], name: str, kind: type, what: str) -> Any:
    try:
        value = json.loads(form.get(name, ""))
    except ValueError:
        raise FormError(name, f"must be {what}") from None
    if not isinstance(value, kind):
        raise FormError(name, f"must be {what}")
    return value

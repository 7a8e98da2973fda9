"""Webhook event types, a registration's events filter, and the exact body of an event.
"""
from __future__ import annotations

import json
from typing import Any

OUTPUT_INTERVAL_SECONDS = 0.5        # at most one job.output event per job per this interval


# webhook_events_filter value -> event type
EVENT_TYPES = {"start": "job.started", "output": "job.output", "completed": "job.completed"}
DEFAULT_EVENTS_FILTER = ("completed",)


# Event types a job has at most once (a unique index on (job_id, type) enforces it).
ONCE_PER_JOB = ("job.started", "job.completed")


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

"""Where job transitions are announced, for code that reacts to them (webhook delivery next).

Transitions: `created`, `started`, `output` (new tokens; from the engine loop, keep hooks cheap),
`completed` (succeeded, failed or canceled), `released` (a job started here left this process
unfinished: handed back to the queue at shutdown, or its lease lost to another worker). A hook gets
`(event, job_id, details)`; its failure is logged and never affects the job.
"""
from __future__ import annotations

import logging
import logging.config
from datetime import datetime
from typing import Any, Callable

log = logging.getLogger(__name__)

JobHook = Callable[[str, str, dict[str, Any]], None]
TRANSITIONS = ("created", "started", "output", "completed", "released")

_hooks: list[JobHook] = []


def register(hook: JobHook) -> JobHook:
    if hook not in _hooks:
        _hooks.append(hook)
    return hook


def unregister(hook: JobHook) -> None:
    if hook in _hooks:
        _hooks.remove(hook)


def has_hooks() -> bool:
    return bool(_hooks)


def emit(event: str, job_id: str, **details: Any) -> None:
    if event not in TRANSITIONS:
        raise ValueError(f"unknown job transition {event!r}")
    for hook in list(_hooks):
        try:
            hook(event, job_id, details)
        except Exception:
            log.exception("job hook %r failed on %s for job %s", hook, event, job_id)


JOB_LOGGER = "genq.jobs"


def _seconds_between(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return round(max((end - start).total_seconds(), 0.0), 6)


_job_log = logging.getLogger(JOB_LOGGER)
_FIELDS = {
    "created": ("priority", "model"),
    "started": ("attempt", "worker_id"),
    "completed": ("status", "finish_reason", "prompt_tokens", "completion_tokens", "cached_tokens", "error_type"),
    "released": ("reason",),
}


def log_job_transition(event: str, job_id: str, details: dict[str, Any]) -> None:
    """A job hook: one log line per job transition (token output is not a transition)."""
    level = logging.WARNING if event == "completed" and details.get("status") == "failed" else logging.INFO
    if event not in _FIELDS or not _job_log.isEnabledFor(level):
        return
    fields: dict[str, Any] = {"event": f"job.{event}", "job_id": job_id}
    fields.update({k: details[k] for k in _FIELDS[event] if details.get(k) is not None})
    if event == "started":
        queue_seconds = _seconds_between(details.get("created_at"), details.get("started_at"))
        if queue_seconds is not None:
            fields["queue_seconds"] = queue_seconds
    _job_log.log(level, "job %s", event, extra=fields)

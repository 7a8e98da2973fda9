"""Job transitions within one process, for code that reacts to them (the log line below, webhook
events, batch progress, the worker's latency metrics). Not to be confused with a job's event log
(app/jobs/event_log.py, what clients stream) or webhook events (app/webhooks/).

Transitions: `created`, `started`, `output` (new tokens; from the engine loop, keep hooks cheap),
`completed` (succeeded, failed or canceled), `released` (a job started here left this process
unfinished: handed back to the queue at shutdown, or its lease lost to another worker). A hook gets
`(transition, job_id, details)`; its failure is logged and never affects the job.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

from app.jobs.serialization import seconds_between

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


def hooks() -> list[JobHook]:
    """The registered hooks, in order (a copy)."""
    return list(_hooks)


def has_hooks() -> bool:
    return bool(_hooks)


def emit(transition: str, job_id: str, **details: Any) -> None:
    if transition not in TRANSITIONS:
        raise ValueError(f"unknown job transition {transition!r}")
    for hook in list(_hooks):
        try:
            hook(transition, job_id, details)
        except Exception:
            log.exception("job hook %r failed on %s for job %s", hook, transition, job_id)


JOB_LOGGER = "genq.jobs"


_job_log = logging.getLogger(JOB_LOGGER)
_FIELDS = {
    "created": ("priority", "model"),
    "started": ("attempt", "worker_id"),
    "completed": ("status", "finish_reason", "prompt_tokens", "completion_tokens", "cached_tokens", "error_type"),
    "released": ("reason",),
}


def log_job_transition(transition: str, job_id: str, details: dict[str, Any]) -> None:
    """A job hook: one log line per job transition (token output is not logged). The log holds ids,
    counts and statuses only: prompts and generated text never reach it, whatever the level."""
    level = logging.WARNING if transition == "completed" and details.get("status") == "failed" else logging.INFO
    if transition not in _FIELDS or not _job_log.isEnabledFor(level):
        return
    fields: dict[str, Any] = {"event": f"job.{transition}", "job_id": job_id}
    fields.update({k: details[k] for k in _FIELDS[transition] if details.get(k) is not None})
    if transition == "started":
        queue_seconds = seconds_between(details.get("created_at"), details.get("started_at"))
        if queue_seconds is not None:
            fields["queue_seconds"] = queue_seconds
    _job_log.log(level, "job %s", transition, extra=fields)

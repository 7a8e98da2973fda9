"""Where job transitions are announced, for code that reacts to them (webhook delivery next).

Transitions: `created`, `started`, `output` (new tokens; from the engine loop, keep hooks cheap),
`completed` (succeeded, failed or canceled), `released` (a job started here left this process
unfinished: handed back to the queue at shutdown, or its lease lost to another worker). A hook gets
`(event, job_id, details)`; its failure is logged and never affects the job.
"""
from __future__ import annotations

import logging
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

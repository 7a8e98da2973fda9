"""The job object as clients see it (`GET /v1/jobs/{id}`), built without Flask so the worker and
the CLI share it."""
from __future__ import annotations

from datetime import datetime
from typing import Any

from app.jobs.models import Job


def isoformat(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat().replace("+00:00", "Z")


def seconds_between(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return round(max((end - start).total_seconds(), 0.0), 6)


def job_metrics(job: Job) -> dict[str, float | None]:
    """queue: created -> started; time to first token: created -> first token (what the client
    waited); generation: started -> completed; tokens per second: completion tokens / generation."""
    generation = seconds_between(job.started_at, job.completed_at)
    tokens_per_second = None
    if generation and job.completion_tokens is not None:
        tokens_per_second = round(job.completion_tokens / generation, 3)
    return {
        "queue_seconds": seconds_between(job.created_at, job.started_at),
        "time_to_first_token_seconds": seconds_between(job.created_at, job.first_token_at),
        "generation_seconds": generation,
        "tokens_per_second": tokens_per_second,
    }


def job_urls(job_id: str, base_url: str) -> dict[str, str]:
    root = f"{base_url.rstrip('/')}/v1/jobs/{job_id}"
    return {"self": root, "cancel": f"{root}/cancel", "events": f"{root}/events"}


def job_to_dict(job: Job, base_url: str) -> dict[str, Any]:
    final = job.status in ("succeeded", "failed", "canceled")
    return {
        "id": job.id,
        "status": job.status,
        "model": job.model,
        "priority": job.priority,
        "service_tier": job.service_tier,
        "created_at": isoformat(job.created_at),
        "started_at": isoformat(job.started_at),
        "completed_at": isoformat(job.completed_at),
        "input": job.input,
        "metadata": job.meta,
        "output": {"text": job.output_text if final else None, "finish_reason": job.finish_reason,
                   **({"choices": job.choices} if final and job.choices else {})},   # n > 1 or logprobs
        "usage": {"prompt_tokens": job.prompt_tokens, "completion_tokens": job.completion_tokens,
                  "cached_prompt_tokens": job.cached_tokens},
        "metrics": job_metrics(job),
        "error": {"type": job.error_type, "message": job.error_message} if job.error_type else None,
        "attempts": job.attempts,
        "urls": job_urls(job.id, base_url),
    }


def done_event_data(result) -> dict[str, Any]:
    """The `done` event's data, from a `JobResult` or a final `Job` row (same attribute names)."""
    status = getattr(result.status, "value", result.status)
    error = None
    if result.error_type:
        error = {"type": result.error_type, "message": result.error_message}
    return {
        "status": status,
        "output": {"text": result.output_text or "", "finish_reason": result.finish_reason},
        "usage": {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens},
        "error": error,
    }

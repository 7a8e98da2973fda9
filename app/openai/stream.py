"""An OpenAI streamed completion (`stream: true`): the job's events, as `app.jobs.follow` yields
them, encoded as OpenAI chunks (`data: {...}` ... `data: [DONE]`).

Chat streams open every choice with the assistant role. Log-probabilities ride on the chunk that
carries their text; tokens whose text is held back (half a character, a possible stop string) pass
theirs on to the next chunk. The closing chunks (finish reasons, usage) come from the job's final
row. A client that hangs up cancels its job: nobody would read the rest.
"""
from __future__ import annotations

import json
import logging
from typing import Any, Iterator

from redis.exceptions import RedisError

from app.jobs import store
from app.jobs.cancel import cancel
from app.jobs.connections import Connections
from app.jobs.event_log import JobEvent
from app.jobs.follow import follow
from app.jobs.models import Job, JobStatus
from app.openai import formats as fmt

log = logging.getLogger(__name__)


def sse_data(payload: Any) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, separators=(',', ':'))}\n\n"


def completion_stream(conn: Connections, endpoint: str, job: Job, n: int, include_usage: bool) -> Iterator[str]:
    finished = False
    try:
        yield from _chunks(conn, endpoint, job, n, include_usage)
        finished = True
    finally:
        if not finished:   # the client hung up: stop generating for nobody
            try:
                cancel(conn, job.id, job.owner)
            except Exception:
                log.exception("could not cancel job %s after its client disconnected", job.id)


def _token_events(conn: Connections, job: Job) -> Iterator[JobEvent]:
    """The job's token events until its `done`; a lost Redis connection ends them early (the
    closing chunks then come from the database as always)."""
    try:
        for item in follow(conn, job.id, job.owner):
            if isinstance(item, JobEvent) and item.type == "token":
                yield item
    except RedisError as exc:
        log.warning("event stream of job %s lost Redis: %s", job.id, exc)


def _chunks(conn: Connections, endpoint: str, job: Job, n: int, include_usage: bool) -> Iterator[str]:
    if endpoint == fmt.CHAT_ENDPOINT:
        for index in range(n):
            yield sse_data(fmt.chunk(endpoint, job, [fmt.delta_choice(endpoint, index, "", role=True)],
                                     with_usage_field=include_usage))
    pending: dict[int, list[dict]] = {}   # per choice: log-probabilities not sent yet
    offsets: dict[int, int] = {}          # per choice: characters sent so far
    for event in _token_events(conn, job):
        data = event.data
        index = data.get("index", 0)
        pending.setdefault(index, []).extend(data.get("logprobs") or [])
        if data.get("text"):
            logprobs = fmt.stream_logprobs(endpoint, pending.pop(index, None) or None, offsets.get(index, 0))
            offsets[index] = offsets.get(index, 0) + len(data["text"])
            choice = fmt.delta_choice(endpoint, index, data["text"], logprobs=logprobs)
            yield sse_data(fmt.chunk(endpoint, job, [choice], with_usage_field=include_usage))
    with conn.sessions() as session:
        final = store.get_job(session, job.id, job.owner)
    if final is None or final.status != JobStatus.SUCCEEDED.value:
        error = fmt.job_error(final) if final is not None else fmt.OpenAIError(404, "the job vanished")
        yield sse_data(error.body())
        yield sse_data("[DONE]")
        return
    for sample in fmt.response_body(endpoint, final)["choices"]:
        left = pending.pop(sample["index"], None) or None   # tokens whose text never came (a cut stop string)
        closing = fmt.delta_choice(endpoint, sample["index"], None, finish_reason=sample["finish_reason"],
                                   logprobs=fmt.stream_logprobs(endpoint, left, offsets.get(sample["index"], 0)))
        yield sse_data(fmt.chunk(endpoint, final, [closing], with_usage_field=include_usage))
    if include_usage:
        yield sse_data(fmt.chunk(endpoint, final, [], fmt.usage(final), with_usage_field=True))
    yield sse_data("[DONE]")

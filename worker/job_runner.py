"""One job, start to end, inside a Celery task thread: claim, generate, record, announce.

Idempotent: a redelivered task for a job that is final, or leased by a live worker, finds nothing
to claim and returns. Only the attempt that holds the claim writes the final result.

Through a database outage (PostgreSQL restarting, connections dropped): the claim, the final write
and the hand-back retry for a while (`app.infra.retry`), and a retry recognises its own earlier write
whose answer was lost. A result that still cannot be stored is not replaced by an error: the job is
left `running` on a lease nobody renews, and the reconciler has it run again once that expires.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import NoReturn

from celery.exceptions import Reject

from app.infra.db import utcnow
from app.infra.retry import is_outage, retry_outage
from app.jobs import fair_queue, store, transitions
from app.jobs.event_log import EventId, JobEvent
from app.jobs.inputs import GenerationInput
from app.jobs.models import JobStatus
from app.jobs.serialization import done_event_data
from app.jobs.store import JobResult
from app.tenancy.keys import DEFAULT_WEIGHT, key_weight
from worker.engine import SamplingParams
from worker.engine_service import GenerationRequest, GenerationResult

log = logging.getLogger(__name__)


CLAIM_RETRY_SECONDS = 15.0    # a claim retries through an outage this long (then the reconciler re-sends the task)
WRITE_RETRY_SECONDS = 30.0    # the final write and a hand-back: this long (then the lease runs out)


def run_job(rt, job_id: str) -> str:
    with rt.arrival(job_id) as arrived:   # the engine may wait briefly for this job (EngineService._gather)
        try:
            job = _claim(rt, job_id)
        except Exception as exc:
            if not is_outage(exc):
                raise
            # Still queued (or leased to us for a lease's length): the reconciler sends the task again.
            log.warning("job %s: could not be claimed (the database is unavailable); the reconciler re-sends it",
                        job_id)
            return "deferred"
        if job is None:
            log.info("job %s: nothing to claim (final, missing, or leased by a live worker)", job_id)
            return "skipped"
        return run_claimed(rt, job, arrived)


def run_claimed(rt, job, arrived: Callable[[], None] | None = None) -> str:
    """Run a job this worker has claimed (by a task, or by the newcomer reserve) to its end.
    `arrived` is called once the job is in the engine's hands (or will not be)."""
    weight = _fair_share_weight(rt, job)
    rt.track(job.id, job.owner, weight)
    try:
        return _run_claimed(rt, job, arrived or (lambda: None), weight)
    finally:
        rt.untrack(job.id)


def claim_newcomer(rt, exclude: frozenset[str]):
    """The newcomer reserve's claim: the first job in fair order of a key not in `exclude` (the keys
    at their weighted share of this worker's task threads, `fair_queue.keys_at_share`), or None.
    Not retried: the reserve looks again soon."""
    with rt.sessions.begin() as session:
        return fair_queue.claim_next(session, rt.worker_id, rt.settings.lease_seconds, exclude=exclude, reserve=True)


def _claim(rt, job_id: str):
    """The job this wake-up runs, retried through an outage: with fair scheduling the one the fair
    order puts first (`fair_queue.claim_next`; `job_id` only says which task woke us), with `fifo` the
    task's own job (`store.claim_job`). A try whose commit went through although the error came back
    has claimed a job: the next try finds it by that try's `started_at`."""
    unknown: list = []   # the claim times of tries that failed: their outcome is unknown
    fair = rt.settings.scheduling == "fair"

    def claim():
        now = utcnow()
        try:
            with rt.sessions.begin() as session:
                if unknown:
                    job = store.claimed_at(session, None if fair else job_id, rt.worker_id, unknown)
                    if job is not None:
                        log.warning("job %s: an earlier try's claim went through; running it", job.id)
                        return job
                if fair:
                    job = fair_queue.claim_next(session, rt.worker_id, rt.settings.lease_seconds, hint=job_id, now=now,
                                                affinity=rt.settings.newcomer_reserve > 0)
                    if job is not None and job.id != job_id:
                        log.debug("task of job %s runs job %s (fair order)", job_id, job.id)
                    return job
                return store.claim_job(session, job_id, rt.worker_id, rt.settings.lease_seconds, now=now)
        except Exception:
            unknown.append(now)
            raise

    return retry_outage(claim, what=f"job {job_id}: claim", seconds=CLAIM_RETRY_SECONDS)


def _run_claimed(rt, job, arrived: Callable[[], None], weight: float) -> str:
    attempt = job.attempts
    if attempt > 1:
        _quietly(rt.events.reset, job.id)   # a retry regenerates from the start
    if attempt > rt.settings.max_attempts:
        # Every earlier attempt ended with its worker gone (lease expired): stop retrying a job
        # that may itself be what kills workers.
        result = JobResult(JobStatus.FAILED, error_type="worker_lost", error_message=(
            f"the job's worker stopped or was lost during each of its {attempt - 1} attempts "
            f"(GENQ_MAX_ATTEMPTS={rt.settings.max_attempts}); giving up"))
        arrived()   # (each path that does not reach the engine says so first: the engine stops waiting for it)
        return _finish(rt, job.id, attempt, result, next_seq=1)
    running = JobEvent(EventId(attempt, 1), "status", {"status": "running", "attempt": attempt})
    transitions.emit("started", job.id, attempt=attempt, created_at=job.created_at, started_at=job.started_at,
                     worker_id=rt.worker_id)

    if job.cancel_requested_at is not None or job.id in rt.cancels:
        arrived()
        _publish(rt, job.id, [running])
        return _finish(rt, job.id, attempt, store.canceled_result(), next_seq=2)
    try:
        spec = GenerationInput.model_validate(job.input)
        params = SamplingParams(**spec.sampling_kwargs())
    except Exception as exc:
        arrived()
        _publish(rt, job.id, [running])
        result = JobResult(JobStatus.FAILED, error_type="invalid_input", error_message=str(exc))
        return _finish(rt, job.id, attempt, result, next_seq=2)

    # The `running` event rides in the engine loop's next pipeline, ahead of the first tokens:
    # one Redis round trip fewer before the first token.
    messages = [m.model_dump() for m in spec.messages] if spec.messages is not None else None
    generation = rt.service.submit(GenerationRequest(
        request_id=job.id, params=params, prompt=spec.prompt, messages=messages, priority=_engine_priority(rt, job),
        tenant=job.owner, weight=weight, attempt=attempt, first_seq=2, announce=(running,)))
    arrived()
    if job.id in rt.cancels:   # the cancel arrived between the claim and the submission
        rt.service.abort(job.id)
    outcome = generation.wait()

    if outcome.error_type == "worker_shutdown":
        _hand_back(rt, job, attempt)
    return _finish(rt, job.id, attempt, _job_result(outcome), next_seq=outcome.next_seq)


def _engine_priority(rt, job) -> int:
    """The engine's order key: with fair scheduling the lane first (flex after every default job),
    then the priority; with `fifo` the priority alone, as before service tiers."""
    if rt.settings.scheduling == "fair":
        return (job.lane or 0) * 10 + job.priority
    return job.priority


def _fair_share_weight(rt, job) -> float:
    """The engine's fair-sharing weight of the job's owner (its API key's `weight`, `genq keys create
    --weight`) against other keys'; 1.0 for a job without a key, or when the database cannot say (the
    job runs either way: fairness never fails a job)."""
    try:
        with rt.sessions() as session:
            return key_weight(session, job.owner)
    except Exception as exc:
        log.warning("job %s: the weight of key %s is unknown (%s); using 1.0", job.id, job.owner, exc)
        return DEFAULT_WEIGHT


def _hand_back(rt, job, attempt: int) -> NoReturn:
    """The worker is stopping mid-generation: requeue the job for another worker, and reject
    this task (acknowledged: a requeue can be lost while the worker stops)."""
    def release() -> bool:
        with rt.sessions.begin() as session:
            return store.release_job(session, job.id, rt.worker_id, attempt)

    try:
        released = retry_outage(release, what=f"job {job.id}: hand-back", seconds=WRITE_RETRY_SECONDS)
    except Exception:
        # Left running on a lease nobody renews: the reconciler sends it again once that expires.
        log.exception("job %s: could not be handed back; its lease will expire", job.id)
        released = False
    log.warning("job %s: worker stopping mid-generation; %s", job.id, "requeued" if released else "no longer ours")
    transitions.emit("released", job.id, reason="worker_shutdown")
    if released:
        # A fresh task, so another worker starts it now; the reconciler re-sends it if Redis is down.
        try:
            rt.send_job(job.id, job.priority)
        except Exception:
            log.warning("job %s: could not re-send its task; the reconciler will", job.id, exc_info=True)
    raise Reject("worker shutting down", requeue=False)


def _job_result(outcome: GenerationResult) -> JobResult:
    usage = {"prompt_tokens": outcome.prompt_tokens, "completion_tokens": len(outcome.token_ids),
             "cached_tokens": outcome.cached_tokens, "first_token_at": outcome.first_token_at}
    if outcome.failed:
        return JobResult(JobStatus.FAILED, output_text=outcome.text, error_type=outcome.error_type,
                         error_message=outcome.error_message, **usage)
    status = JobStatus.CANCELED if outcome.finish_reason == "abort" else JobStatus.SUCCEEDED
    if outcome.choices:   # n > 1: usage counts every sample's tokens
        usage["completion_tokens"] = sum(choice["completion_tokens"] for choice in outcome.choices)
    return JobResult(status, output_text=outcome.text, finish_reason=outcome.finish_reason,
                     choices=outcome.choices, **usage)


def _finish(rt, job_id: str, attempt: int, result: JobResult, next_seq: int) -> str:
    try:
        written = _write_result(rt, job_id, attempt, result)
    except Exception as exc:
        if is_outage(exc):
            # The database stayed down through the retries: an error written instead would fail
            # too, and would end a job that can still succeed. Leave it running: nobody renews its
            # lease now, so the reconciler has it run again once the lease expires.
            log.error("job %s: attempt %d's result could not be stored (the database is unavailable); "
                      "the job runs again once its lease expires", job_id, attempt)
            transitions.emit("released", job_id, reason="result_not_stored")
            return "not_stored"
        # The result itself could not be stored: record the failure rather than leave the job running.
        log.exception("job %s: storing the result failed", job_id)
        result = JobResult(JobStatus.FAILED, error_type="internal_error",
                           error_message=f"the result could not be stored ({type(exc).__name__})",
                           prompt_tokens=result.prompt_tokens, first_token_at=result.first_token_at)
        written = _write_result(rt, job_id, attempt, result)
    if not written:
        log.warning("job %s: attempt %d no longer owns the job; its result is dropped", job_id, attempt)
        transitions.emit("released", job_id, reason="superseded")
        return "superseded"
    events = [JobEvent(EventId(attempt, next_seq), "status", {"status": result.status.value})]
    if result.error_type:
        events.append(JobEvent(events[-1].id.next, "error",
                               {"type": result.error_type, "message": result.error_message}))
    events.append(JobEvent(events[-1].id.next, "done", done_event_data(result)))
    _publish(rt, job_id, events)
    transitions.emit("completed", job_id, status=result.status.value, finish_reason=result.finish_reason,
                     prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens,
                     cached_tokens=result.cached_tokens, error_type=result.error_type)
    return result.status.value


def _write_result(rt, job_id: str, attempt: int, result: JobResult) -> bool:
    """`store.finish_job`, retried through an outage; False when this attempt no longer owns the
    job. A try whose commit went through although the error came back wrote the result: the next
    try finds it by that try's `completed_at` (and the events and hooks then follow once)."""
    unknown: list = []   # the completion times of tries that failed: their outcome is unknown

    def write() -> bool:
        now = utcnow()
        try:
            with rt.sessions.begin() as session:
                if store.finish_job(session, job_id, rt.worker_id, attempt, result, now=now):
                    fair_queue.settle(session, job_id, result.prompt_tokens, result.cached_tokens,
                                      result.completion_tokens)
                    return True
                return store.finished_at(session, job_id, rt.worker_id, attempt, unknown)
        except Exception:
            unknown.append(now)
            raise

    return retry_outage(write, what=f"job {job_id}: storing its result", seconds=WRITE_RETRY_SECONDS)


def _publish(rt, job_id: str, events: list[JobEvent]) -> None:
    _quietly(rt.events.publish, job_id, events)


def _quietly(fn, *args) -> None:
    try:
        fn(*args)
    except Exception:
        log.exception("job event publishing failed (the database stays the record)")

"""The engine service: one `LLMEngine` per worker process, owned by one loop thread.

Task threads hand work to the loop through a queue (`submit`, `abort`) and wait on a `Generation`
handle. Each engine step, one Redis pipeline appends every running job's new tokens to its event
log and publishes them on its channel; then the handles of finished requests are resolved, so a
job's last token event always precedes its final database write and `done` event.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Callable

from app.infra.db import utcnow
from app.infra.retry import is_outage
from app.jobs import transitions
from app.jobs.event_log import EventId, EventLog, JobEvent
from worker.engine import CompletionOutput, LLMEngine, RequestOutput, SamplingParams
from worker.engine.stats import EngineStats

log = logging.getLogger(__name__)

_STOP = object()


def name_os_thread(name: str) -> None:
    """Give the calling thread `name` (15 bytes at most) as the operating system sees it, where it
    can (Linux): Python's thread names are its own, so without this every thread of a worker reads
    "python" in `top -H` and /proc/<pid>/task/*/comm. Nothing happens where it cannot."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(15, name.encode()[:15], 0, 0, 0)   # 15: PR_SET_NAME
    except (OSError, AttributeError):
        pass


@dataclass(slots=True)
class GenerationRequest:
    request_id: str
    params: SamplingParams
    prompt: str | list[int] | None = None
    messages: list[dict[str, str]] | None = None   # chat: templated by the loop thread
    priority: int = 0                               # lower = more urgent
    tenant: str | None = None                       # fair sharing: whose job (the API key id); None: anonymous
    weight: float = 1.0                             # ... and its share relative to other tenants'
    attempt: int = 1                                # token event ids are `<attempt>-<seq>`
    first_seq: int = 1
    announce: tuple[JobEvent, ...] = ()             # published with the first step's tokens, before them

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("a generation request takes exactly one of prompt or messages")


@dataclass(frozen=True, slots=True)
class ServiceStats:
    """What a worker reports of its engine: the engine's snapshot, and the jobs handed to it."""
    engine: EngineStats
    jobs_in_flight: int

    def as_dict(self) -> dict[str, Any]:
        return {**self.engine.as_dict(), "jobs_in_flight": self.jobs_in_flight}


@dataclass(slots=True)
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str | None          # "stop" | "length" | "abort"; None when it failed
    prompt_tokens: int = 0
    cached_tokens: int = 0
    first_token_at: datetime | None = None
    next_seq: int = 1                  # the first event seq after this generation's token events
    error_type: str | None = None
    error_message: str | None = None
    choices: list[dict[str, Any]] | None = None   # every sample, when n > 1 or logprobs were asked for

    @property
    def failed(self) -> bool:
        return self.error_type is not None


class Generation:
    """A request inside the engine, as its submitting thread sees it."""

    def __init__(self, request: GenerationRequest):
        self.request = request
        self.next_seq = request.first_seq
        self.first_token_at: datetime | None = None
        self.last: RequestOutput | None = None
        self.result: GenerationResult | None = None
        self._done = threading.Event()

    def wait(self, timeout: float | None = None) -> GenerationResult | None:
        self._done.wait(timeout)
        return self.result

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def resolve(self, result: GenerationResult) -> None:
        self.result = result
        self._done.set()

    def fail(self, error_type: str, message: str) -> None:
        completion = self.last.outputs[0] if self.last is not None else None
        self.resolve(GenerationResult(
            text=completion.text if completion else "", token_ids=list(completion.token_ids) if completion else [],
            finish_reason=None, prompt_tokens=len(self.last.prompt_token_ids) if self.last else 0,
            first_token_at=self.first_token_at, next_seq=self.next_seq, error_type=error_type,
            error_message=message))


GATHER_SECONDS = 0.15   # longest wait, before a step that starts from nothing, for jobs still arriving


class EngineService:
    def __init__(self, engine: LLMEngine, events: EventLog | None = None, *, stats_interval: float = 0.5,
                 on_stats: Callable[[ServiceStats], None] | None = None,
                 arriving: Callable[[], int] | None = None, gather_seconds: float = GATHER_SECONDS):
        self.engine = engine
        self.events = events
        self.stats_interval = stats_interval
        self.on_stats = on_stats
        # how many jobs the caller has taken on and not yet submitted (claims under way); None: unknown
        self.arriving = arriving
        self.gather_seconds = gather_seconds
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._generations: dict[str, Generation] = {}   # loop thread only
        self._announcements: list[tuple[str, tuple[JobEvent, ...]]] = []   # loop thread only
        self._stats: ServiceStats | None = None   # None until the loop's first report
        self._last_report = 0.0
        self._thread = threading.Thread(target=self._run, name="genq-engine-loop", daemon=True)
        self._started = False

    # -- any thread -----------------------------------------------------------------------------

    def start(self) -> "EngineService":
        if not self._started:
            self._started = True
            self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        if self._started and self._thread.is_alive():
            self._inbox.put((_STOP, None))
            self._thread.join(timeout)

    def submit(self, request: GenerationRequest) -> Generation:
        generation = Generation(request)
        if not self._thread.is_alive():
            generation.fail("worker_shutdown", "the engine loop is not running")
            return generation
        self._inbox.put(("add", generation))
        return generation

    def abort(self, request_id: str) -> None:
        """Stop a request: the engine frees its blocks before its next step, and the request's
        handle resolves with finish_reason "abort" and the text generated so far."""
        self._inbox.put(("abort", request_id))

    def stats(self) -> ServiceStats | None:
        return self._stats

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    @property
    def healthy(self) -> bool:
        """False once the engine says so (a tensor-parallel engine that lost a rank)."""
        return self._stats is None or self._stats.engine.healthy

    # -- the loop thread ------------------------------------------------------------------------

    def _run(self) -> None:
        name_os_thread("genq-engine")   # (top -H, and benchmarks/fairness.py's CPU accounting, see it)
        try:
            while self._drain(block=not self.engine.has_unfinished_requests()):
                if self.engine.has_unfinished_requests():
                    if not self._gather():
                        break
                    self._step()
                self._maybe_report()
        except Exception:
            log.exception("engine loop crashed")
        finally:
            for generation in self._generations.values():
                generation.fail("worker_shutdown", "the worker stopped before the job finished")
            self._generations.clear()
            self._drain_rejecting()

    def _gather(self) -> bool:
        """Before a step that starts from nothing (requests waiting, none running, no output pending),
        wait up to `gather_seconds` while jobs are still arriving (`arriving`: claimed or being claimed, not yet
        submitted), taking them in as they come: a burst of jobs, which reach the engine one by one
        through their claims, is then prefilled in one step, instead of its first job alone while the
        rest wait for that step to end. Never while sequences are running (their next token would
        wait). False once asked to stop."""
        if self.arriving is None or not self.engine.starts_cold():
            return True
        deadline = time.monotonic() + self.gather_seconds
        while self.arriving() > 0 and self.engine.starts_cold():   # (an abort may come meanwhile)
            left = deadline - time.monotonic()
            if left <= 0:
                break
            if not self._drain(block=True, timeout=min(left, 0.002)):
                return False
        return self._drain(block=False)   # a job submits before it stops counting: take the last one in

    def _drain(self, block: bool, timeout: float | None = None) -> bool:
        """Apply queued commands; False once asked to stop. Blocks (briefly: `timeout`, else the
        stats interval) only when asked to."""
        try:
            command = (self._inbox.get(timeout=self.stats_interval if timeout is None else timeout) if block
                       else self._inbox.get_nowait())
        except queue.Empty:
            return True
        while True:
            kind, arg = command
            if kind is _STOP:
                return False
            if kind == "add":
                self._add(arg)
            elif kind == "abort":
                if arg in self._generations:
                    self.engine.abort_request(arg)
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                return True

    def _drain_rejecting(self) -> None:
        while True:
            try:
                kind, arg = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                arg.fail("worker_shutdown", "the worker stopped before the job started")

    def _add(self, generation: Generation) -> None:
        request = generation.request
        try:
            prompt = request.prompt if request.messages is None else self.engine.apply_chat_template(request.messages)
            self.engine.add_request(request.request_id, prompt, request.params, request.priority,
                                    tenant=request.tenant, weight=request.weight)
        except ValueError as exc:
            self._announce_now(request)
            generation.fail("invalid_request", str(exc))
            return
        except Exception as exc:
            log.exception("engine rejected request %s", request.request_id)
            self._announce_now(request)
            generation.fail("engine_error", f"{type(exc).__name__}: {exc}")
            return
        self._generations[request.request_id] = generation
        if request.announce:
            self._announcements.append((request.request_id, request.announce))

    def _announce_now(self, request: GenerationRequest) -> None:
        if request.announce and self.events is not None:
            try:
                self.events.publish(request.request_id, request.announce)
            except Exception:
                log.exception("publishing the events of %s failed", request.request_id)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as exc:
            self._fail_all(exc)
            return
        finished = self._publish(outputs, utcnow())
        self._resolve(finished)   # after the pipeline ran: a job's last token event precedes its result

    def _fail_all(self, exc: Exception) -> None:
        """The engine itself raised: every generation fails, its announcements published first."""
        log.exception("engine step raised; failing its %d request(s)", len(self._generations))
        pending = {request_id for request_id, _ in self._announcements}
        for generation in self._generations.values():
            if generation.request.request_id in pending:
                self._announce_now(generation.request)
        self._announcements.clear()
        for request_id, generation in list(self._generations.items()):
            self._abort_quietly(request_id)
            generation.fail("engine_error", f"{type(exc).__name__}: {exc}")
        self._generations.clear()

    def _publish(self, outputs: list[RequestOutput], now: datetime) -> list[Generation]:
        """One Redis pipeline per step: the pending announcements, then each generation's new token
        events (and its `output` transitions). Returns the generations that finished."""
        pipe = self.events.redis.pipeline(transaction=False) if self.events is not None else None
        if pipe is not None:
            for request_id, events in self._announcements:
                for event in events:
                    self.events.append(pipe, request_id, event)
        self._announcements.clear()
        finished: list[Generation] = []
        for output in outputs:
            generation = self._generations.get(output.request_id)
            if generation is None:
                continue
            self._publish_tokens(pipe, generation, output, now)
            generation.last = output
            if output.finished:
                finished.append(generation)
        if pipe is not None and len(pipe):
            _execute(pipe)
        return finished

    def _publish_tokens(self, pipe, generation: Generation, output: RequestOutput, now: datetime) -> None:
        for completion in output.outputs:
            if not (completion.new_token_ids or completion.new_text):
                continue
            if generation.first_token_at is None:
                generation.first_token_at = now
            if pipe is not None:
                self.events.append(pipe, output.request_id, self._token_event(generation, completion))
            generation.next_seq += 1
            if completion.index == 0 and transitions.has_hooks():
                transitions.emit("output", output.request_id, text=completion.text)

    def _token_event(self, generation: Generation, completion: CompletionOutput) -> JobEvent:
        params = generation.request.params
        data = {"text": completion.new_text, "token_ids": list(completion.new_token_ids)}
        if params.logprobs is not None and completion.logprobs and completion.new_token_ids:
            fresh = len(completion.new_token_ids)   # the last `fresh` tokens are this step's
            data["logprobs"] = self._logprob_entries(completion.token_ids[-fresh:], completion.logprobs[-fresh:],
                                                     params.logprobs)
        if params.n > 1:
            data["index"] = completion.index   # n > 1: each sample's deltas are tagged
        return JobEvent(EventId(generation.request.attempt, generation.next_seq), "token", data)

    def _resolve(self, finished: list[Generation]) -> None:
        for generation in finished:
            del self._generations[generation.request.request_id]
            generation.resolve(self._result(generation))

    def _abort_quietly(self, request_id: str) -> None:
        try:
            self.engine.abort_request(request_id)
        except Exception:
            log.exception("could not abort %s", request_id)

    def _result(self, generation: Generation) -> GenerationResult:
        output = generation.last
        completion = output.outputs[0]
        params = generation.request.params
        choices = None
        if params.n > 1 or params.logprobs is not None:
            choices = [self._choice(c, params.logprobs) for c in sorted(output.outputs, key=lambda c: c.index)]
        result = GenerationResult(
            text=completion.text, token_ids=list(completion.token_ids), finish_reason=completion.finish_reason,
            prompt_tokens=len(output.prompt_token_ids), cached_tokens=output.num_cached_tokens,
            first_token_at=generation.first_token_at, next_seq=generation.next_seq, choices=choices)
        if output.error is not None:
            result.finish_reason = None
            # a constraint the grammar library rejects (or that allows no token) is the request's fault
            kind = "invalid_request" if output.error.startswith("StructuredOutputError") else "engine_error"
            result.error_type, result.error_message = kind, output.error
        return result

    def _logprob_entries(self, token_ids, logprobs, top_k: int) -> list[dict[str, Any]]:
        """[{token, logprob, top: [[token, logprob], ...] (best first, top_k of them)}] per token."""
        decode = self._token_text
        return [{"token": decode(token), "logprob": _finite(step.get(token, -9999.0)),
                 "top": [[decode(t), _finite(lp)] for t, lp in sorted(step.items(), key=lambda kv: -kv[1])[:top_k]]}
                for token, step in zip(token_ids, logprobs)]

    def _choice(self, completion, top_k: int | None) -> dict[str, Any]:
        """One sample as a job stores it; log-probabilities carry token strings (the API has no
        tokenizer): [{token, logprob, top: [[token, logprob], ...] (best first, top_k of them)}]."""
        choice = {"index": completion.index, "text": completion.text, "finish_reason": completion.finish_reason,
                  "completion_tokens": len(completion.token_ids)}
        if top_k is not None and completion.logprobs is not None:
            choice["logprobs"] = self._logprob_entries(completion.token_ids, completion.logprobs, top_k)
        return choice

    def _token_text(self, token_id: int) -> str:
        return self.engine.tokenizer.decode([token_id])

    def _maybe_report(self) -> None:
        now = time.monotonic()
        if now - self._last_report < self.stats_interval:
            return
        self._last_report = now
        self._stats = ServiceStats(self.engine.stats(), len(self._generations))
        if self.on_stats is not None:
            try:
                self.on_stats(self._stats)
            except Exception:
                log.exception("reporting engine stats failed")


_OUTAGE_LOG_SECONDS = 5.0     # while Redis is down, one line per this long (not one traceback per engine step)
_last_outage_log = 0.0
_outages_unlogged = 0


def _execute(pipe) -> None:
    global _last_outage_log, _outages_unlogged
    try:
        for result in pipe.execute(raise_on_error=False):
            if isinstance(result, Exception):
                log.error("publishing token events failed: %s", result)
                break
    except Exception as exc:
        if not is_outage(exc):
            log.exception("publishing token events failed (the final text still reaches the database)")
            return
        now = time.monotonic()
        if now - _last_outage_log < _OUTAGE_LOG_SECONDS:
            _outages_unlogged += 1
            return
        log.error("publishing token events failed: Redis unavailable (%s: %s; %d more step(s) since the last "
                  "report); the final text still reaches the database", type(exc).__name__, exc, _outages_unlogged)
        _last_outage_log, _outages_unlogged = now, 0


def _finite(logprob: float) -> float:
    """JSON (and PostgreSQL's jsonb) has no -inf: a masked-out token's logprob is floored, as OpenAI does."""
    return max(float(logprob), -9999.0) if logprob == logprob else -9999.0

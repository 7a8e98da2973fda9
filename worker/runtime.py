"""Everything one worker process holds: its engine service, connections, and two helper threads
(the lease heartbeat and the control-channel listener). Celery tasks reach it with `get_runtime()`."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import socket
import threading
import time

from celery.exceptions import Reject

from app.infra.broker import send_run_job
from app.infra.model_reports import model_reported, publish_model
from app.infra.retry import is_outage
from app.infra.settings import Settings
from app.infra.worker_reports import remove_report, write_report
from app.jobs import store
from app.jobs.connections import Connections
from app.jobs.fair_queue import AFFINITY_SECONDS, keys_at_share, tenant_of
from app.openai.batches import sweep_batches
from app.webhooks.sweep import sweep_webhooks
from worker.devices import select_device
from worker.engine import LLMEngine, SamplingParams
from worker.engine_service import EngineService, ServiceStats
from worker.faults import install_fault
from worker.job_runner import claim_newcomer, run_claimed, run_job
from worker.reconciler import Reconciler

log = logging.getLogger(__name__)

RECENT_CANCEL_SECONDS = 600.0
HEARTBEAT_RETRY_SECONDS = 0.5   # a failed lease renewal is tried again this soon
NEWCOMER_LOOK_SECONDS = 2.0     # a busy worker's newcomer reserve looks this often unwoken (announcements lost,
                                # jobs re-queued); an announced job of a key under its share, at once
EXPECT_SECONDS = 1.0            # a received job task counts as arriving at most this long before a thread takes it

_runtime: "WorkerRuntime | None" = None
_runtime_lock = threading.Lock()


def build_engine(settings: Settings):
    """The worker's engine, loaded and warmed up in a thread of its own that then ends.

    Why not in the calling (main) thread: OpenMP (libgomp, which PyTorch and the CPU kernels share)
    keeps one pool of worker threads per thread that ever started a parallel region, and once the
    process holds more such threads than it has CPUs, its idle workers stop spinning and sleep at
    once, so every parallel region of a step pays a wake-up. A main thread that loaded the model
    keeps its pool for good; the engine then steps in `genq-engine-loop`, a second pool, and ran a
    single stream at ~0.65x the speed of the same engine stepped from the main thread (2-core EPYC,
    bfloat16: 49 against 77 tok/s; float32 37 against 47). A thread's pool goes when the thread ends,
    so loading in a short-lived thread leaves the loop thread's pool the only one."""
    built: dict = {}

    def build() -> None:
        try:
            built["engine"] = _build_engine(settings)
        except BaseException as exc:   # re-raised in the caller's thread
            built["error"] = exc

    # daemon: a Ctrl-C during a long load interrupts join() and the process exits without waiting for it
    thread = threading.Thread(target=build, name="genq-engine-build", daemon=True)
    thread.start()
    thread.join()
    if "error" in built:
        raise built["error"]
    return built["engine"]


def _build_engine(settings: Settings):
    device = select_device(settings)
    if settings.torch_threads is not None:
        # On a CPU shared with the API, fewer OpenMP threads than cores avoids their spinning
        # against each other (a tiny model's step gets many times slower when oversubscribed).
        import torch

        torch.set_num_threads(settings.torch_threads)
    engine = LLMEngine(device=device, max_prompt_tokens_per_step=settings.prompt_tokens_per_step(device),
                       **settings.engine_kwargs())
    warm_up(engine)
    return engine


WARM_UP_ROWS = 4     # requests of a warm-up round, ending one after another: steps of 4, 3, 2 and 1 rows
WARM_UP_ROUNDS = 2   # so each size is seen twice or more after the skipped first steps (StepCost.MIN_BUCKET_STEPS)


def warm_up(engine: LLMEngine, prompt: str = "Hello", max_tokens: int = 4) -> float:
    """A short greedy generation before the worker reports healthy, so the first job does not pay
    for kernel builds and cold caches: WARM_UP_ROUNDS rounds of WARM_UP_ROWS requests of `prompt`,
    the i-th generating `max_tokens + 2 i` tokens, so the decode steps hold 4, then 3, 2 and 1
    rows. Those steps of several small sizes are also what the engine's step cost model
    (fairness.StepCost) needs to know a small step's cost before a flood runs only large ones."""
    start = time.monotonic()
    tag = secrets.token_hex(4)
    for round_ in range(WARM_UP_ROUNDS):
        for i in range(WARM_UP_ROWS):
            engine.add_request(f"genq-warm-up-{tag}-{round_}-{i}", prompt,
                               SamplingParams(max_tokens=max_tokens + 2 * i, temperature=0.0, ignore_eos=True))
        while engine.has_unfinished_requests():
            engine.step()
    seconds = time.monotonic() - start
    log.info("engine warmed up in %.2f s (%d steps)", seconds, engine.counters["steps"])
    return seconds


class RecentCancels:
    """Job ids whose cancel arrived on the control channel, remembered for a while: a cancel can
    land between a job's claim and its submission to the engine."""

    def __init__(self, keep_seconds: float = RECENT_CANCEL_SECONDS):
        self.keep_seconds = keep_seconds
        self._ids: dict[str, float] = {}
        self._lock = threading.Lock()

    def add(self, job_id: str) -> None:
        now = time.monotonic()
        with self._lock:
            self._ids[job_id] = now
            for stale in [k for k, t in self._ids.items() if now - t > self.keep_seconds]:
                del self._ids[stale]

    def __contains__(self, job_id: str) -> bool:
        with self._lock:
            return job_id in self._ids


class WorkerRuntime:
    def __init__(self, settings: Settings, engine=None):
        self.settings = settings
        self.worker_id = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self.connections = conn = Connections.open(settings)
        self.redis_url, self.redis, self.channels = conn.redis_url, conn.redis, conn.channels
        self.events, self.sessions = conn.events, conn.sessions
        self.engine = engine if engine is not None else build_engine(settings)
        install_fault(self.engine, settings.fault_injection)   # test only; nothing when unset
        self.service = EngineService(self.engine, self.events, stats_interval=settings.stats_interval_seconds,
                                     on_stats=self._report, arriving=self.arriving)
        self.cancels = RecentCancels()
        self._active: dict[str, tuple[str, float]] = {}   # job id -> (tenant, weight), for the heartbeat
        self._newcomers: set[str] = set()          # ids of the jobs the newcomer reserve runs now
        self._announced: set[str] = set()          # keys with a job queued since the reserve last looked ("" no key)
        self._announcement = threading.Event()     # ... set when one arrives (the reserve's wake-up)
        self.announcements = 0                     # announcements received (for tests and debugging)
        self._arriving = 0                         # jobs task threads are claiming, not yet submitted
        self._expected: dict[str, float] = {}      # job id -> when Celery received its task (no thread yet)
        self._active_lock = threading.Lock()
        self._stopping = threading.Event()
        self._draining = threading.Event()          # no new newcomer claims once a drain began
        self._threads = [threading.Thread(target=self._heartbeat, name="genq-heartbeat", daemon=True),
                         threading.Thread(target=self._listen_control, name="genq-control", daemon=True)]
        if settings.newcomer_reserve:
            self._threads.append(threading.Thread(target=self._newcomer_reserve, name="genq-newcomers", daemon=True))
        self._control_ready = threading.Event()
        self._tokenizer_json: str | None = None      # the engine's tokenizer, for the API (publish_model)
        self.reconciler = Reconciler(settings, self.sessions, self.redis, self.channels, self.send_job,
                                     extra_sweeps=(self._sweep_webhooks, self._sweep_batches))

    def start(self) -> "WorkerRuntime":
        # the model's report before the worker's first live report (the service's stats): the API's
        # /health, once it sees a live worker, loads the tokenizer from it (app/api/health.py)
        self.publish_model()
        self.service.start()
        for thread in self._threads:
            thread.start()
        self._control_ready.wait(10)
        self.reconciler.start()
        log.info("worker %s ready: model %s", self.worker_id, getattr(self.engine, "model_name", "?"))
        return self

    def stop(self) -> None:
        self._draining.set()
        self._stopping.set()
        self._announcement.set()   # (the newcomer reserve's wait)
        self.reconciler.stop()
        self.service.stop()
        for thread in self._threads:
            thread.join(5)
        shutdown = getattr(self.engine, "shutdown", None)
        if shutdown is not None:
            shutdown()   # stops the engine's tensor-parallel rank processes, if any
        try:
            remove_report(self.redis, self.channels, self.worker_id)
        except Exception:
            log.warning("could not remove the worker report of %s", self.worker_id)

    def run_job(self, job_id: str) -> str:
        return run_job(self, job_id)

    @property
    def celery(self):
        """A Celery app for sending tasks from this process's own threads."""
        return self.connections.celery

    def send_job(self, job_id: str, priority: int = 0) -> None:
        """Enqueue `genq.run_job(job_id)` (the reconciler, and jobs handed back on shutdown)."""
        send_run_job(self.celery, self.settings, job_id, priority)

    def _sweep_webhooks(self) -> None:
        sweep_webhooks(self.settings, self.sessions, self.celery, grace_seconds=self.settings.requeue_after_seconds)

    def _sweep_batches(self) -> None:
        sweep_batches(self.settings, self.sessions, self.redis, self.channels, self.celery)

    def drain(self, timeout: float) -> None:
        """Graceful shutdown (Celery takes no new tasks by now): let running jobs finish for up to
        `timeout` seconds, then stop the engine, which hands the rest back to the queue at once."""
        self._draining.set()
        deadline = time.monotonic() + timeout
        while self.active_jobs() and time.monotonic() < deadline:
            time.sleep(0.1)
        left = self.active_jobs()
        if left:
            log.warning("drain timeout: releasing %d running job(s) to other workers", len(left))
        self.service.stop()

    # -- bookkeeping for the heartbeat ------------------------------------------------------------

    def track(self, job_id: str, owner: str | None = None, weight: float = 1.0) -> None:
        with self._active_lock:
            self._active[job_id] = (owner or "", weight)

    def untrack(self, job_id: str) -> None:
        with self._active_lock:
            self._active.pop(job_id, None)

    def active_jobs(self) -> list[str]:
        with self._active_lock:
            return list(self._active)

    def expect(self, job_id: str) -> None:
        """Celery received the task of `job_id` (its consumer thread, before any task thread runs it):
        the job counts in `arriving` from now, until a thread takes it on (`arrival`) or, should none
        ever do, for EXPECT_SECONDS."""
        with self._active_lock:
            now = time.monotonic()
            self._prune_expected(now)
            self._expected[job_id] = now

    @contextlib.contextmanager
    def arrival(self, job_id: str | None = None):
        """A task thread taking on a job (the task's, `job_id`): counted in `arriving` (which the
        engine loop reads before a step that starts from nothing) until the callable this yields is
        called, once the job is submitted to the engine, or the block ends."""
        with self._active_lock:
            self._arriving += 1
            if job_id is not None:
                self._expected.pop(job_id, None)
        counted = True

        def arrived() -> None:
            nonlocal counted
            if counted:
                counted = False
                with self._active_lock:
                    self._arriving -= 1
        try:
            yield arrived
        finally:
            arrived()

    def arriving(self) -> int:
        """Jobs on their way to the engine: received by Celery and not yet taken by a thread (for
        EXPECT_SECONDS at most), or being claimed and submitted by one."""
        if not self._expected:
            return self._arriving
        with self._active_lock:
            self._prune_expected(time.monotonic())
            return self._arriving + len(self._expected)

    def _prune_expected(self, now: float) -> None:   # (under _active_lock)
        for job_id in [j for j, at in self._expected.items() if now - at >= EXPECT_SECONDS]:
            del self._expected[job_id]

    def running_tenants(self) -> list[tuple[str, float]]:
        """(key, its weight) of every job this worker runs, one entry a job ("" for no key)."""
        with self._active_lock:
            return list(self._active.values())

    def keys_at_share(self) -> frozenset[str]:
        """The keys holding at least their weighted share of this worker's task threads, which its
        newcomer reserve leaves out (`fair_queue.keys_at_share`)."""
        running = self.running_tenants()
        return keys_at_share([tenant for tenant, _ in running], self.settings.worker_concurrency, dict(running))

    # -- helper threads ---------------------------------------------------------------------------

    def _newcomer_reserve(self) -> None:
        """Fair scheduling's newcomer reserve: while this worker's task threads are all busy
        (`max_num_seqs` jobs in flight), it claims the first job in fair order of a key under its
        share of this worker's seats (`fair_queue.keys_at_share`) into one of
        `settings.newcomer_reserve` engine slots kept for that; so a key that arrives while another
        floods the service starts at once instead of waiting for a running job to end. The job's
        own task later finds it taken and claims whatever is next (or nothing).

        When it looks: at once when the API announces a job of a key this worker does not hold at
        its share (`broker.announce_queued`, on the control channel; the flood's own announcements
        cost no claim), again at once after a claim (a burst of jobs, while the reserve has room),
        once more AFFINITY_SECONDS later if one found nothing (the job may have been left to the
        worker running its key's jobs, and is anyone's after that; announcements until then cost no
        claim either), and every NEWCOMER_LOOK_SECONDS unwoken (jobs queued without an announcement:
        re-queued, or a lost message). Until 2026-12-02 it claimed every 0.25 s, which cost a busy
        worker ~3% of a core on a 2-core CPU (docs/fairness.md)."""
        reserve = self.settings.newcomer_reserve
        next_look = time.monotonic() + NEWCOMER_LOOK_SECONDS
        held_until = 0.0     # after a woken look that found nothing, announcements wait for the next look
        while True:
            self._announcement.wait(max(0.0, next_look - time.monotonic()))
            with self._active_lock:
                announced, self._announced = self._announced, set()
                self._announcement.clear()
            if self._stopping.is_set():   # (after the clear: stop() sets it before its wake-up)
                return
            now = time.monotonic()
            unwoken = now >= next_look
            if unwoken:
                next_look = now + NEWCOMER_LOOK_SECONDS
            with self._active_lock:   # task threads' jobs (a newcomer's thread may not have tracked its job yet)
                busy = len(self._active.keys() - self._newcomers)
                full = len(self._newcomers) >= reserve
            if self._draining.is_set() or full or busy < self.settings.worker_concurrency:
                continue
            exclude = self.keys_at_share()
            if not unwoken and (announced <= exclude or now < held_until):
                continue     # only keys at their share here were announced, or a look just found nothing
            try:
                job = claim_newcomer(self, exclude)
            except Exception as exc:
                log.warning("newcomer reserve: claim failed (%s: %s)", type(exc).__name__, exc)
                continue
            if job is None:
                if not unwoken:   # (a young job left to its key's worker is anyone's AFFINITY_SECONDS later)
                    next_look = held_until = min(next_look, now + AFFINITY_SECONDS + 0.05)
                continue
            log.info("job %s: started in the newcomer reserve (key %s is under its share here)", job.id, job.owner)
            with self._active_lock:
                self._newcomers.add(job.id)
                self._announced |= announced | {tenant_of(job.owner)}   # a burst: look again at once, while it has room
            self._announcement.set()
            threading.Thread(target=self._run_newcomer, args=(job,), name=f"genq-newcomer-{job.id}").start()

    def announced(self, owner: str | None) -> None:
        """A job of `owner` was queued (the API's announcement on the control channel)."""
        with self._active_lock:
            self.announcements += 1
            self._announced.add(tenant_of(owner))
        self._announcement.set()

    def _run_newcomer(self, job) -> None:
        try:
            run_claimed(self, job)
        except Reject:   # handed back on shutdown (no task to reject: the job is queued again)
            pass
        except Exception:
            log.exception("job %s: the newcomer reserve's run failed", job.id)
        finally:
            with self._active_lock:
                self._newcomers.discard(job.id)

    def _heartbeat(self) -> None:
        """Renew the leases of this worker's running jobs every third of a lease; after a failure
        (the database unavailable) every HEARTBEAT_RETRY_SECONDS, so that a lease outlives an
        outage shorter than itself and the job is not run a second time elsewhere."""
        interval = max(self.settings.lease_seconds / 3, 0.2)
        wait = interval
        while not self._stopping.wait(wait):
            wait = interval
            self.publish_model(only_if_missing=True)
            job_ids = self.active_jobs()
            if not job_ids:
                continue
            try:
                with self.sessions.begin() as session:
                    store.renew_leases(session, self.worker_id, job_ids, self.settings.lease_seconds)
            except Exception as exc:
                wait = min(interval, HEARTBEAT_RETRY_SECONDS)
                if is_outage(exc):
                    log.warning("lease heartbeat failed (the database is unavailable): %s; retrying in %.1f s",
                                type(exc).__name__, wait)
                else:
                    log.exception("lease heartbeat failed")

    def _listen_control(self) -> None:
        while not self._stopping.is_set():
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(self.channels.control)
                self._control_ready.set()
                while not self._stopping.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    if message is not None:
                        self._on_control(message["data"])
            except Exception:
                log.exception("control channel failed; resubscribing")
                self._stopping.wait(1.0)
            finally:
                pubsub.close()

    def _on_control(self, raw: str) -> None:
        try:
            message = json.loads(raw)
        except ValueError:
            log.warning("ignoring malformed control message %r", raw)
            return
        if message.get("type") == "cancel" and isinstance(message.get("job_id"), str):
            self.cancels.add(message["job_id"])
            self.service.abort(message["job_id"])
        elif message.get("type") == "queued" and self.settings.newcomer_reserve:
            self.announced(message.get("owner") if isinstance(message.get("owner"), str) else None)

    def publish_model(self, only_if_missing: bool = False) -> None:
        """Tell the API the served model's tokenizer and context length (app/infra/model_reports.py),
        under the name jobs ask for: the API measures prompts with them when it cannot read the model
        files itself. Written once the engine is loaded, and again if Redis lost it."""
        max_model_len = getattr(self.engine, "max_model_len", None)
        if not max_model_len:
            return
        try:
            if only_if_missing and model_reported(self.redis, self.channels, self.settings.model_name):
                return
            if self._tokenizer_json is None:
                self._tokenizer_json = engine_tokenizer_json(self.engine)
            tokenizer_json = self._tokenizer_json
            if tokenizer_json is None:
                return
            publish_model(self.redis, self.channels, self.settings.model_name, tokenizer_json=tokenizer_json,
                          max_model_len=max_model_len, worker_id=self.worker_id)
        except Exception:
            log.warning("could not report model %s to the API", self.settings.model_name, exc_info=True)

    def _report(self, stats: ServiceStats) -> None:
        write_report(self.redis, self.channels, self.worker_id, {
            "model": getattr(self.engine, "model_name", None), "pid": os.getpid(),
            "device": str(getattr(self.engine, "device", "")) or None,
            "concurrency": self.settings.worker_concurrency, "engine": stats.as_dict(),
            "max_num_seqs": self.settings.max_num_seqs})


def engine_tokenizer_json(engine) -> str | None:
    """The engine's tokenizer as `tokenizer.json` text (what `tokenizers.Tokenizer.from_str` reads):
    the fast tokenizer transformers built from the model directory, added tokens included. None when
    the engine has no fast tokenizer."""
    backend = getattr(getattr(engine, "tokenizer", None), "backend_tokenizer", None)
    if backend is None:
        return None
    try:
        return backend.to_str()
    except Exception:
        log.warning("cannot serialize the engine's tokenizer", exc_info=True)
        return None


def get_runtime(settings: Settings | None = None) -> WorkerRuntime:
    """The process's runtime, created (model loaded, threads started) on first use."""
    global _runtime
    with _runtime_lock:
        if _runtime is None:
            _runtime = WorkerRuntime(settings or Settings.from_env()).start()
        return _runtime


def stop_runtime() -> None:
    global _runtime
    with _runtime_lock:
        if _runtime is not None:
            _runtime.stop()
            _runtime = None

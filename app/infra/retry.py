"""Retrying one step through a short database or Redis outage: the worker's claim, final write and
release, a webhook delivery's reads and writes, a batch step. What counts as an outage is what the
API answers 503 for (`app.infra.problems.outage`: PostgreSQL refused or dropped a connection, the pool
is exhausted, SQLite is locked, Redis or the broker refused or timed out); anything else is raised
at once.

The retries are short and bounded (exponential back-off with jitter, `seconds` in all): a longer
outage raises the last error, and the step's own recovery takes over (a job's lease expires and the
reconciler runs it again; the webhook and batch sweeps re-send what is overdue).

A step whose write may have committed although its connection dropped before the answer (a commit
whose outcome is unknown) must make its retry recognise its own earlier write: the callers pass a
value only that try wrote (the claim's `started_at`, the result's `completed_at`, ...) and look for it
when the conditional write then matches nothing.
"""
from __future__ import annotations

import logging
import random
import time
from typing import Callable, TypeVar

from app.infra.problems import outage

log = logging.getLogger(__name__)

T = TypeVar("T")

OUTAGE_RETRY_SECONDS = 15.0     # how long a step keeps retrying through an outage, by default
FIRST_DELAY_SECONDS = 0.1
MAX_DELAY_SECONDS = 2.0


def retry_outage(fn: Callable[[], T], *, what: str, seconds: float = OUTAGE_RETRY_SECONDS,
                 first_delay: float = FIRST_DELAY_SECONDS, max_delay: float = MAX_DELAY_SECONDS,
                 sleep: Callable[[float], object] = time.sleep, clock: Callable[[], float] = time.monotonic) -> T:
    """`fn()`, called again after a growing pause (`first_delay`, doubling up to `max_delay`, each
    between half and all of it) while it raises an outage error, for up to `seconds`; then the last
    error is raised. Any other exception is raised at once."""
    deadline = clock() + seconds
    delay = first_delay
    tries = 0
    while True:
        tries += 1
        try:
            return fn()
        except Exception as exc:
            down = outage(exc)
            if down is None:
                raise
            left = deadline - clock()
            if left <= 0:
                log.warning("%s: %s still unavailable after %d tries (%.0f s); giving up: %s", what,
                            down.dependency, tries, seconds, _short(exc))
                raise
            pause = min(delay * random.uniform(0.5, 1.0), left)
            log.warning("%s: %s unavailable (%s); retry %d in %.2f s", what, down.dependency, _short(exc), tries,
                        pause)
            sleep(pause)
            delay = min(delay * 2, max_delay)


def is_outage(exc: BaseException) -> bool:
    return outage(exc) is not None


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]

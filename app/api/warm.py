"""An API process's warm-up: what its first request would otherwise pay for, done in a thread of its
own as the process starts (the gunicorn worker, after the fork; app/api/server.py).

Measured on a 2-core AMD EPYC VM (`genq up`, SmolLM2, a streamed 79-token completion right after
/health answered 200): the first request took ~0.2 s longer than the second in the API alone,
~0.15 s of it loading the tokenizer a worker reported (the context check, app/tenancy/context_window.py)
and most of the rest the Celery producer's first use (imports, the broker connection, the task
sender). So this thread opens the database and broker connections, builds the producer, and looks
for the model's tokenizer every WARM_POLL_SECONDS until it is known (a worker reports it once its
engine is loaded) or WARM_FOR_SECONDS have passed (then the lazy look at first use remains, as before).
/health also loads it before answering 200, so a client that waits for /health finds it loaded
in the process that answered.
"""
from __future__ import annotations

import logging
import threading
import time

from flask import Flask
from sqlalchemy import text

log = logging.getLogger(__name__)

WARM_POLL_SECONDS = 1.0
WARM_FOR_SECONDS = 900.0   # a worker's first start may convert a GGUF and load a large model


def start_warming(app: Flask, poll_seconds: float = WARM_POLL_SECONDS, for_seconds: float = WARM_FOR_SECONDS,
                  stop: threading.Event | None = None) -> threading.Thread:
    """Start the warm-up thread (a daemon: it never holds the process up); returns it."""
    thread = threading.Thread(target=warm, args=(app, poll_seconds, for_seconds, stop or threading.Event()),
                              name="genq-api-warm-up", daemon=True)
    thread.start()
    return thread


def warm(app: Flask, poll_seconds: float, for_seconds: float, stop: threading.Event) -> bool:
    """Connections and producer, then the context window until it is known or time is up; whether
    the context window is known at the end. Never raises: a dependency that is down is the first
    request's to report."""
    svc = app.extensions["genq"]
    _quietly("the database connection", lambda: _select_one(svc))
    _quietly("the Celery producer", lambda: _producer(svc.celery))
    window = app.extensions["genq_admission"].context_window
    deadline = time.monotonic() + for_seconds
    while True:
        # (Redis pinged first: the context window logs a warning for every look that Redis refuses)
        known = _quietly("Redis", svc.redis.ping) and _quietly("the model's context", window.warm)
        if known:
            log.info("API warmed up: the model's tokenizer and context length are loaded")
            return True
        if time.monotonic() >= deadline or stop.wait(poll_seconds):
            return False


def _select_one(svc) -> None:
    with svc.sessions() as session:
        session.execute(text("SELECT 1"))


def _producer(celery) -> None:
    celery.backend   # noqa: B018 (send_task reads it; built on first access)
    celery.amqp      # noqa: B018 (the task sender)
    with celery.producer_or_acquire() as producer:
        producer.connection.ensure_connection(max_retries=1)


def _quietly(what: str, fn):
    try:
        return fn()
    except Exception as exc:
        log.debug("warm-up: %s not ready (%s: %s)", what, type(exc).__name__, exc)
        return None

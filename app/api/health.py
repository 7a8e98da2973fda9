"""/healthz (the process is alive), /readyz (its database and Redis answer; else 503 + Retry-After,
its `checks` saying which is down), /health (that, and a worker's engine is loaded and warm: the
service can generate now; this process loads the tokenizer the workers reported, for its context
check, before it says so; what vLLM, TGI and SGLang serve, so standard clients and load balancers
accept genq as it is), /metrics."""
from __future__ import annotations

import logging

from flask import Blueprint, Response, current_app, jsonify
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from app.api.admission import admission
from app.api.problems import problem_response
from app.api.services import services
from app.infra.problems import OUTAGE_RETRY_AFTER_SECONDS
from app.infra.worker_reports import live_workers

log = logging.getLogger(__name__)

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz():
    return jsonify({"status": "ok"})


@bp.get("/readyz")
def readyz():
    checks, failures = _dependencies(services())
    if failures:
        return _not_ready(checks, failures)
    return jsonify({"status": "ready", "checks": checks})


@bp.get("/health")
def health():
    svc = services()
    checks, failures = _dependencies(svc)
    workers = 0
    if not failures:
        try:
            workers = len(live_workers(svc.redis, svc.channels))
        except Exception as exc:
            failures.append(f"workers: {type(exc).__name__}: {exc}")
        checks["workers"] = workers
        if workers == 0 and not failures:
            failures.append("no worker has its engine loaded yet (a worker reports once its engine is warm)")
        elif not failures:
            # this process's context check loads the tokenizer the worker reported now, not in the
            # first request after this answer (app/api/warm.py); a report it cannot read leaves the
            # lazy look at first use, as before, and is no reason to say not ready
            try:
                admission().context_window.warm()
            except Exception:
                log.warning("health: could not load the workers' reported tokenizer", exc_info=True)
    if failures:
        return _not_ready(checks, failures)
    return jsonify({"status": "ok", "checks": checks})


def _not_ready(checks: dict, failures: list[str]):
    return problem_response(503, "; ".join(failures), title="Not ready", type="not-ready", checks=checks,
                            headers={"Retry-After": str(OUTAGE_RETRY_AFTER_SECONDS)})


def _dependencies(svc) -> tuple[dict, list[str]]:
    """Whether the database and Redis answer: ({name: "ok" | "unreachable"}, failure texts)."""
    checks, failures = {}, []
    try:
        with svc.sessions() as session:
            session.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = "unreachable"
        failures.append(f"database: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    try:
        svc.redis.ping()
        checks["redis"] = "ok"
    except Exception as exc:
        checks["redis"] = "unreachable"
        failures.append(f"redis: {type(exc).__name__}: {exc}")
    return checks, failures


@bp.get("/metrics")
def metrics():
    registry = current_app.extensions["genq_metrics"].registry
    return Response(generate_latest(registry), mimetype=CONTENT_TYPE_LATEST)

"""/healthz (the process is alive), /readyz (its database and Redis answer; else 503 + Retry-After,
its `checks` saying which is down), /metrics."""
from __future__ import annotations

from flask import Blueprint, Response, current_app, jsonify
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from app.api.problems import problem_response
from app.api.services import services
from app.infra.problems import OUTAGE_RETRY_AFTER_SECONDS

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz():
    return jsonify({"status": "ok"})


@bp.get("/readyz")
def readyz():
    svc = services()
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
    if failures:
        return problem_response(503, "; ".join(failures), title="Not ready", type="not-ready", checks=checks,
                                headers={"Retry-After": str(OUTAGE_RETRY_AFTER_SECONDS)})
    return jsonify({"status": "ready", "checks": checks})


@bp.get("/metrics")
def metrics():
    registry = current_app.extensions["genq_metrics"].registry
    return Response(generate_latest(registry), mimetype=CONTENT_TYPE_LATEST)

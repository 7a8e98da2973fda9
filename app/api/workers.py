"""/v1/workers: every live worker with its engine's latest stats (what it batches, its KV use)."""
from __future__ import annotations

from flask import Blueprint, jsonify

from app.api.services import services
from app.infra.worker_reports import live_workers

bp = Blueprint("workers", __name__, url_prefix="/v1/workers")


@bp.get("")
def list_workers():
    svc = services()
    return jsonify({"data": live_workers(svc.redis, svc.channels)})

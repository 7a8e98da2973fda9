"""/v1/usage: what the calling key got — its jobs by status, its tokens, its fair-sharing weight and
counter, and how long its recent jobs waited in the queue. A key sees its own figures only (an
operator sees every key's on /metrics, or with `genq keys usage`)."""
from __future__ import annotations

from flask import Blueprint, jsonify

from app.api.auth import current_key
from app.api.services import services
from app.jobs import fair_queue, store
from app.jobs.models import ALL_STATUSES

bp = Blueprint("usage", __name__, url_prefix="/v1/usage")

WAIT_WINDOW = 1000     # queue waits over this many of the key's most recent started jobs


def percentile(values: list[float], q: float) -> float | None:
    """The q-quantile (0..1) of `values` by the nearest rank; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))], 6)


@bp.get("")
def get_usage():
    key = current_key()
    svc = services()
    with svc.sessions() as session:
        usage = store.usage_by_owner(session, key.id).get(key.id, store.KeyUsage(jobs={}))
        waits = [seconds for _, seconds in store.recent_queue_waits(session, WAIT_WINDOW, key.id)]
        share = fair_queue.shares(session, key.id).get(key.id)
    return jsonify({
        "object": "usage", "key": key.id, "weight": key.weight, "scheduling": svc.settings.scheduling,
        "jobs": {status: usage.jobs.get(status, 0) for status in ALL_STATUSES},
        "prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
        "fair_share": {"counter": share["counter"] if share else 0.0,
                       "served_tokens": share["served_tokens"] if share else 0},
        "queue_wait_seconds": {"window": len(waits), "p50": percentile(waits, 0.5), "p95": percentile(waits, 0.95),
                               "max": max(waits) if waits else None},
    })

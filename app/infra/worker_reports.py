"""Worker status reports in Redis: each worker writes its engine stats every few hundred ms; the
API lists the live ones (`/v1/workers`, `/metrics`)."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Literal

from redis import Redis

from app.infra.channels import Channels

LIVE_SECONDS = 30.0   # a worker silent this long is no longer listed


@dataclass(frozen=True, slots=True)
class EngineStat:
    metric: str | None   # the worker's Prometheus name (a counter's gets `_total`); None: in the report only
    kind: Literal["gauge", "counter", "info"]   # counter: cumulative since the engine started
    help: str


# What each stat of a report's "engine" means: the worker's `EngineStats` fields plus the service's
# `jobs_in_flight` (tests/worker/test_engine_stats.py keeps them equal). The worker's /metrics exports
# those with a metric, under that name and help; the API's /metrics exports the same ones as
# `genq_engine_<key>{worker,model}` gauges.
ENGINE_STATS: dict[str, EngineStat] = {
    "running": EngineStat("genq_num_requests_running", "gauge", "Requests in the engine's running batch"),
    "waiting": EngineStat("genq_num_requests_waiting", "gauge",
                          "Requests waiting in the engine for KV blocks or a batch slot"),
    "kv_blocks_used": EngineStat("genq_kv_cache_blocks_used", "gauge", "KV cache blocks in use"),
    "kv_blocks_total": EngineStat("genq_kv_cache_blocks_total", "gauge", "KV cache blocks in the pool"),
    "prefix_cache_hits": EngineStat("genq_prefix_cache_hits", "counter", "Prefix cache hits, in full KV blocks"),
    "prefix_cache_queries": EngineStat("genq_prefix_cache_queries", "counter",
                                       "Prefix cache lookups, in full KV blocks"),
    "preemptions": EngineStat("genq_num_preemptions", "counter",
                              "Requests preempted (KV blocks ran out) to be recomputed"),
    "steps": EngineStat("genq_engine_steps", "counter", "Engine steps run"),
    "prompt_tokens": EngineStat("genq_prompt_tokens", "counter",
                                "Prefill tokens processed (recomputed tokens included)"),
    "generation_tokens": EngineStat("genq_generation_tokens", "counter", "Generated tokens"),
    "max_batch_size": EngineStat("genq_batch_size_max", "gauge", "Largest batch (requests in one step) so far"),
    "jobs_in_flight": EngineStat("genq_jobs_in_flight", "gauge",
                                 "Jobs this worker has handed to its engine and not finished"),
    "failed_steps": EngineStat(None, "counter", "Engine steps that raised; their requests failed"),
    "shared_steps": EngineStat("genq_engine_shared_steps", "counter",
                               "Engine steps narrowed so that no API key in them is slowed more than an equal "
                               "share of the engine would slow it (GENQ_FAIR_STEP_SHARE)"),
    "tensor_parallel_size": EngineStat(None, "info", "GPUs the engine spans (tensor-parallel engines only)"),
    "healthy": EngineStat(None, "info", "False once a tensor-parallel rank is lost (the worker turns unhealthy)"),
    "tensor_parallel_error": EngineStat(None, "info", "Why the tensor-parallel engine failed"),
}
EXPORTED_ENGINE_STATS = {key: stat for key, stat in ENGINE_STATS.items() if stat.metric is not None}


def write_report(redis: Redis, channels: Channels, worker_id: str, report: dict[str, Any],
                 ttl_seconds: float = LIVE_SECONDS) -> None:
    now = time.time()
    pipe = redis.pipeline(transaction=False)
    pipe.set(channels.worker_stats(worker_id), json.dumps({**report, "worker_id": worker_id, "reported_at": now}),
             px=int(ttl_seconds * 1000))
    pipe.zadd(channels.workers, {worker_id: now})
    pipe.zremrangebyscore(channels.workers, "-inf", now - ttl_seconds)
    pipe.execute()


def remove_report(redis: Redis, channels: Channels, worker_id: str) -> None:
    pipe = redis.pipeline(transaction=False)
    pipe.delete(channels.worker_stats(worker_id))
    pipe.zrem(channels.workers, worker_id)
    pipe.execute()


def live_workers(redis: Redis, channels: Channels) -> list[dict[str, Any]]:
    ids = redis.zrangebyscore(channels.workers, time.time() - LIVE_SECONDS, "+inf")
    if not ids:
        return []
    reports = redis.mget([channels.worker_stats(worker_id) for worker_id in ids])
    return [json.loads(report) for report in reports if report]

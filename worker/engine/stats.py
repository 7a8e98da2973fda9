"""A snapshot of an engine's state and cumulative counters (`LLMEngine.stats()`).

What each field means, and under which metric name it is exported, is `app.infra.worker_reports.ENGINE_STATS`
(the engine is a library and knows nothing of the service).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

TENSOR_PARALLEL_FIELDS = ("tensor_parallel_size", "healthy", "tensor_parallel_error")


@dataclass(frozen=True, slots=True)
class EngineStats:
    running: int = 0
    waiting: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    prefix_cache_hits: int = 0
    prefix_cache_queries: int = 0
    preemptions: int = 0
    steps: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    max_batch_size: int = 0
    failed_steps: int = 0
    shared_steps: int = 0                     # steps fair_step_share narrowed
    tensor_parallel_size: int | None = None   # None: a single-device engine
    healthy: bool = True                      # False once a tensor-parallel rank is lost
    tensor_parallel_error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """As reported (JSON): a single-device engine's report has no tensor-parallel keys."""
        skip = TENSOR_PARALLEL_FIELDS if self.tensor_parallel_size is None else ()
        return {name: getattr(self, name) for name in FIELD_NAMES if name not in skip}


FIELD_NAMES = tuple(f.name for f in fields(EngineStats))

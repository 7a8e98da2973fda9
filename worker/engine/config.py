"""Engine configuration: what the caller chose, checked once."""
from __future__ import annotations

from dataclasses import dataclass, fields

DTYPES = ("float32", "bfloat16", "float16")
DEFAULT_CPU_KV_CACHE_BYTES = 1 << 30
DEFAULT_TP_TIMEOUT_SECONDS = 300.0          # longest wait for a collective or a rank's answer
DEFAULT_GPU_MEMORY_UTILIZATION = 0.85       # share of free device memory for weights' leftovers
SCHEDULING = ("fair", "fifo")


@dataclass(slots=True)
class EngineConfig:
    model: str | None = None
    dtype: str = "float32"
    device: str = "cpu"
    block_size: int = 16
    num_kv_blocks: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    # prompt tokens (prefill and recomputation) a step takes at most, unless one prompt is alone; None:
    # up to max_num_batched_tokens. Bounds the stall that a burst of prompts puts on running streams and
    # spreads the burst's first tokens over several steps (scheduler.py, docs/engine.md)
    max_prompt_tokens_per_step: int | None = None
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    seed: int = 0
    kernel_impl: str | None = None           # force "triton" | "cpu" | "torch" kernels; None: by device
    kv_cache_bytes: int | None = None        # CPU budget when num_kv_blocks is None
    tensor_parallel_size: int = 1
    tp_timeout_seconds: float = DEFAULT_TP_TIMEOUT_SECONDS
    cache_dir: str | None = None             # converted GGUF models and built CPU kernels; None: ~/.cache/genq
    # waiting requests of one priority: "fair" (tenants by their virtual token counters, fairness.py) or
    # "fifo" (by arrival alone)
    scheduling: str = "fair"
    # under "fair": a step that several tenants want work in costs at most N times what the least of
    # them wants would cost alone (processor sharing; scheduler.py, docs/fairness.md)
    fair_step_share: bool = True
    # under fair_step_share: the part of the fixed cost's worth a light tenant's step holds for the
    # others (1: that step costs up to W / w times the light tenant's tokens alone; 0.7: up to
    # 1 + 0.7 (W / w - 1) times; less: cheaper for it, narrower for them; fairness.StepCost.cap,
    # docs/fairness.md#shared-steps)
    fair_light_allowance: float = 0.7

    @classmethod
    def from_kwargs(cls, **kwargs) -> EngineConfig:
        """`EngineConfig(**kwargs)`, but an unknown keyword is a TypeError that lists the accepted ones
        (callers such as LLMEngine take the fields as **kwargs)."""
        accepted = [f.name for f in fields(cls)]
        unknown = sorted(set(kwargs) - set(accepted))
        if unknown:
            raise TypeError(f"unknown engine argument(s): {', '.join(unknown)}; accepted: {', '.join(accepted)}")
        return cls(**kwargs)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}")
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "tensor_parallel_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if self.max_prompt_tokens_per_step is not None and (
                not isinstance(self.max_prompt_tokens_per_step, int) or self.max_prompt_tokens_per_step < 1):
            raise ValueError(f"max_prompt_tokens_per_step must be a positive integer or None, "
                             f"got {self.max_prompt_tokens_per_step!r}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
        if self.kernel_impl not in (None, "triton", "cpu", "torch"):
            raise ValueError(f"kernel_impl must be 'triton', 'cpu', 'torch' or None, got {self.kernel_impl!r}")
        if self.tp_timeout_seconds <= 0:
            raise ValueError(f"tp_timeout_seconds must be > 0, got {self.tp_timeout_seconds!r}")
        if not (isinstance(self.fair_light_allowance, (int, float)) and 0 < self.fair_light_allowance <= 1):
            raise ValueError(f"fair_light_allowance must be in (0, 1], got {self.fair_light_allowance!r}")
        if self.scheduling not in SCHEDULING:
            raise ValueError(f"scheduling must be one of {SCHEDULING}, got {self.scheduling!r}")
        if self.kv_cache_bytes is None:
            self.kv_cache_bytes = DEFAULT_CPU_KV_CACHE_BYTES

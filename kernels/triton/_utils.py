"""Helpers shared by the Triton wrappers."""
from __future__ import annotations

import functools

import torch
import triton


def empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer a wrapper allocates goes through here, so tests can poison them (fill with NaN)
    and prove each kernel writes everything it later reads or returns."""
    return torch.empty(shape, dtype=dtype, device=device)


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors on `device`; a fixed stand-in off CUDA (the interpreter), so
    launch heuristics behave the same way there as on a mid-sized GPU."""
    if device.type == "cuda":
        return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 16

"""Linear layers: y = x W^T + b, W in nn.Linear's [out_features, in_features] layout."""
from __future__ import annotations

import torch

from kernels._dispatch import resolve_impl


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           impl: str | None = None) -> torch.Tensor:
    """x: [..., in_features]. On the CPU, float32 decode-sized batches (at most
    `cpu_kernels.LINEAR_MAX_ROWS` rows) go to the compiled kernel; everything else, and
    impl="torch" or "triton" (cuBLAS does this well), is torch.nn.functional.linear."""
    if resolve_impl(impl, x) == "cpu":
        from kernels import cpu_kernels

        if cpu_kernels.linear_supports(x, weight, bias) and cpu_kernels.linear_available():
            return cpu_kernels.linear(x, weight, bias)
    return torch.nn.functional.linear(x, weight, bias)

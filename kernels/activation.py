"""SwiGLU's activation: silu(gate) * up over a fused gate|up projection."""
from __future__ import annotations

import torch

from kernels._dispatch import resolve_impl


def silu_and_mul_torch(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.split(gate_up.shape[-1] // 2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def silu_and_mul(gate_up: torch.Tensor, impl: str | None = None) -> torch.Tensor:
    """gate_up: [..., 2 * intermediate], gate first. Returns [..., intermediate]."""
    if resolve_impl(impl, gate_up) == "cpu":
        from kernels import cpu_kernels

        if cpu_kernels._elementwise_ok(gate_up) and cpu_kernels.available():
            return cpu_kernels.silu_and_mul(gate_up)
    return silu_and_mul_torch(gate_up)

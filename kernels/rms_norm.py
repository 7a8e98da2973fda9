"""RMSNorm, optionally fused with the residual add that precedes it."""
from __future__ import annotations

import torch

from kernels._dispatch import resolve_impl


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float,
                   residual: torch.Tensor | None = None):
    # Computed in float32 as Llama does, cast back before the weight multiply.
    if residual is not None:
        x = x + residual
        residual = x
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    out = weight * xf.to(x.dtype)
    return out if residual is None else (out, residual)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
             impl: str | None = None):
    """x: [num_tokens, hidden]. Returns the normed tensor, or (normed, x + residual) when
    `residual` is given (the new residual stream)."""
    which = resolve_impl(impl, x)
    if which == "triton":
        from kernels.triton.rms_norm import rms_norm_triton
        return rms_norm_triton(x, weight, eps, residual)
    if which == "cpu":
        from kernels import cpu_kernels

        if cpu_kernels.rms_norm_supports(x, weight, residual) and cpu_kernels.available():
            return cpu_kernels.rms_norm(x, weight, eps, residual)
    return rms_norm_torch(x, weight, eps, residual)

"""Rotary position embedding (rotate-half / NeoX style, as Llama), applied in place to q and k."""
from __future__ import annotations

import torch

from kernels._dispatch import resolve_impl


def rotary_embedding_torch(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                           cos_sin_cache: torch.Tensor) -> None:
    # q: [num_tokens, num_heads, head_dim], k: [num_tokens, num_kv_heads, head_dim]
    # cos_sin_cache: [max_position, head_dim]: cos in the first half, sin in the second.
    half = cos_sin_cache.shape[-1] // 2
    cos_sin = cos_sin_cache.index_select(0, positions.long())
    cos = cos_sin[:, None, :half]
    sin = cos_sin[:, None, half:]
    for x in (q, k):
        # Both halves are computed before either is written: for float32 `.float()` returns a
        # view of x, so writing the first half early would corrupt x1.
        x1 = x[..., :half].float()
        x2 = x[..., half:].float()
        o1 = (x1 * cos - x2 * sin).to(x.dtype)
        o2 = (x2 * cos + x1 * sin).to(x.dtype)
        x[..., :half] = o1
        x[..., half:] = o2


def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                     cos_sin_cache: torch.Tensor, impl: str | None = None) -> None:
    which = resolve_impl(impl, q)
    if which == "triton":
        from kernels.triton.rotary import rotary_embedding_triton
        return rotary_embedding_triton(positions, q, k, cos_sin_cache)
    if which == "cpu":
        from kernels import cpu_kernels

        if cpu_kernels.rotary_supports(positions, q, k, cos_sin_cache) and cpu_kernels.available():
            return cpu_kernels.rotary_embedding(positions, q, k, cos_sin_cache)
    return rotary_embedding_torch(positions, q, k, cos_sin_cache)

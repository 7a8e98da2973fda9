"""Triton rotary embedding (rotate-half / NeoX style), in place on q and k: one program per token
rotates every query and key head of that token."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton._utils import next_pow2


@triton.jit
def _rotate_heads(x_ptr, stride_h, stride_d, num_heads, half, cos, sin,
                  BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    # x_ptr points at this token's row; cos, sin: [BLOCK_HALF] float32
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_HALF)
    mask = (heads[:, None] < num_heads) & (dims[None, :] < half)
    p1 = x_ptr + heads[:, None] * stride_h + dims[None, :] * stride_d
    p2 = p1 + half * stride_d
    x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(p2, mask=mask, other=0.0).to(tl.float32)
    out1 = x1 * cos[None, :] - x2 * sin[None, :]
    out2 = x2 * cos[None, :] + x1 * sin[None, :]
    tl.store(p1, out1.to(x_ptr.dtype.element_ty), mask=mask)
    tl.store(p2, out2.to(x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(
    pos_ptr, q_ptr, k_ptr, cache_ptr,
    stride_qt, stride_qh, stride_qd,
    stride_kt, stride_kh, stride_kd,
    stride_cache,
    num_q_heads, num_k_heads, half,
    BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + token).to(tl.int64)
    dims = tl.arange(0, BLOCK_HALF)
    dmask = dims < half
    cos = tl.load(cache_ptr + pos * stride_cache + dims, mask=dmask, other=0.0).to(tl.float32)
    sin = tl.load(cache_ptr + pos * stride_cache + half + dims, mask=dmask, other=0.0).to(tl.float32)
    _rotate_heads(q_ptr + token * stride_qt, stride_qh, stride_qd, num_q_heads, half, cos, sin,
                  BLOCK_HQ, BLOCK_HALF)
    _rotate_heads(k_ptr + token * stride_kt, stride_kh, stride_kd, num_k_heads, half, cos, sin,
                  BLOCK_HK, BLOCK_HALF)


def rotary_embedding_triton(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                            cos_sin_cache: torch.Tensor) -> None:
    # positions: [num_tokens]; q: [num_tokens, num_heads, head_dim]; k: [num_tokens, num_kv_heads, head_dim]
    # (q and k are written in place through their strides, so views of a fused qkv output work);
    # cos_sin_cache: [max_position, head_dim], cos in the first half, sin in the second.
    num_tokens, num_q_heads, head_dim = q.shape
    num_k_heads = k.shape[1]
    assert k.shape == (num_tokens, num_k_heads, head_dim), (q.shape, k.shape)
    assert cos_sin_cache.shape[-1] == head_dim and head_dim % 2 == 0
    if num_tokens == 0:
        return
    cache = cos_sin_cache if cos_sin_cache.stride(-1) == 1 else cos_sin_cache.contiguous()
    half = head_dim // 2
    block_hq, block_hk, block_half = next_pow2(num_q_heads), next_pow2(num_k_heads), next_pow2(half)
    _rotary_kernel[(num_tokens,)](
        positions, q, k, cache,
        *q.stride(), *k.stride(), cache.stride(0),
        num_q_heads, num_k_heads, half,
        BLOCK_HQ=block_hq, BLOCK_HK=block_hk, BLOCK_HALF=block_half,
        num_warps=4 if block_hq * block_half >= 1024 else 2,
    )

"""KV-cache store: write a step's new keys and values into their cache slots."""
from __future__ import annotations

import torch

from kernels._dispatch import resolve_impl


def store_kv_torch(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    # k, v: [num_tokens, num_kv_heads, head_dim]; caches: [num_blocks, block_size, num_kv_heads, head_dim]
    # slot = block_id * block_size + offset; -1 marks padding and is skipped.
    slots = slot_mapping.long()
    valid = slots >= 0
    if not bool(valid.all()):
        slots, k, v = slots[valid], k[valid], v[valid]
    num_kv_heads, head_dim = k_cache.shape[-2:]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, k.to(k_cache.dtype))
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, v.to(v_cache.dtype))


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor, impl: str | None = None) -> None:
    which = resolve_impl(impl, k)
    if which == "triton":
        from kernels.triton.kv_cache import store_kv_triton
        return store_kv_triton(k, v, k_cache, v_cache, slot_mapping)
    if which == "cpu":
        from kernels import cpu_kernels

        if cpu_kernels.store_kv_supports(k, v, k_cache, v_cache, slot_mapping) and cpu_kernels.available():
            return cpu_kernels.store_kv(k, v, k_cache, v_cache, slot_mapping)
    return store_kv_torch(k, v, k_cache, v_cache, slot_mapping)

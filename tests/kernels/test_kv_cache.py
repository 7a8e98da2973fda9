"""Triton KV-cache store against the PyTorch reference, under the interpreter."""
from __future__ import annotations

import pytest
import torch

import kernels
from kernels.kv_cache import store_kv_torch
from kernels.triton.kv_cache import store_kv_triton


@pytest.mark.parametrize("num_tokens,num_kv_heads,head_dim,block_size,num_blocks,src_dtype,cache_dtype", [
    (7, 2, 64, 16, 4, torch.float32, torch.float32),
    (20, 8, 128, 32, 3, torch.bfloat16, torch.bfloat16),
    (11, 3, 64, 16, 5, torch.float32, torch.float16),   # heads not a power of 2; cast on store
])
def test_matches_reference(gen, num_tokens, num_kv_heads, head_dim, block_size, num_blocks, src_dtype, cache_dtype):
    num_slots = num_blocks * block_size
    # Padding tokens (-1) scattered through the batch; real tokens get distinct slots.
    slots = torch.randperm(num_slots, generator=gen)[:num_tokens]
    slots[torch.randperm(num_tokens, generator=gen)[:max(1, num_tokens // 4)]] = -1
    # k and v as views of a fused [num_tokens, (2 * kv) * head_dim] projection, rows strided.
    kv = torch.randn(num_tokens, 2 * num_kv_heads * head_dim, generator=gen).to(src_dtype)
    k = kv[:, :num_kv_heads * head_dim].view(num_tokens, num_kv_heads, head_dim)
    v = kv[:, num_kv_heads * head_dim:].view(num_tokens, num_kv_heads, head_dim)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    # The caches start full of other sequences' data, which every skipped slot must keep.
    k_cache = torch.randn(shape, generator=gen).to(cache_dtype)
    v_cache = torch.randn(shape, generator=gen).to(cache_dtype)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    store_kv_torch(k, v, k_ref, v_ref, slots)
    kv_before = kv.clone()

    store_kv_triton(k, v, k_cache, v_cache, slots)

    assert torch.equal(kv, kv_before)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
    written = torch.zeros(num_slots, dtype=torch.bool)
    written[slots[slots >= 0]] = True
    assert not written.all() and written.sum() == (slots >= 0).sum()


def test_int64_slot_mapping_and_dispatch(gen):
    k = torch.randn(5, 2, 64, generator=gen)
    v = torch.randn(5, 2, 64, generator=gen)
    slots = torch.tensor([3, -1, 17, 0, 31], dtype=torch.int64)
    k_cache = torch.randn(2, 16, 2, 64, generator=gen)
    v_cache = torch.randn(2, 16, 2, 64, generator=gen)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    kernels.store_kv(k, v, k_ref, v_ref, slots)
    kernels.store_kv(k, v, k_cache, v_cache, slots, impl="triton")
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)

"""Triton rotary embedding (in place on q and k) against the PyTorch reference."""
from __future__ import annotations

import pytest
import torch

import kernels
from kernels.rotary import rotary_embedding_torch
from kernels.triton.rotary import rotary_embedding_triton
from tests.kernels.helpers import assert_close


def cos_sin_cache(max_position: int, head_dim: int, base: float = 10000.0) -> torch.Tensor:
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    freqs = torch.outer(torch.arange(max_position, dtype=torch.float64), inv_freq)
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).float()  # [max_position, head_dim]


@pytest.mark.parametrize("num_tokens,num_heads,num_kv_heads,head_dim,dtype", [
    (6, 4, 2, 64, torch.float32),
    (9, 8, 2, 128, torch.bfloat16),
    (4, 6, 3, 64, torch.float16),   # head counts not a power of 2
])
def test_matches_reference(gen, num_tokens, num_heads, num_kv_heads, head_dim, dtype):
    # q, k, v as views of one fused qkv projection: the kernel must rotate q and k through their
    # strides and leave v alone.
    width = (num_heads + 2 * num_kv_heads) * head_dim
    qkv = torch.randn(num_tokens, width, generator=gen).to(dtype)
    positions = torch.randint(0, 500, (num_tokens,), generator=gen)
    cache = cos_sin_cache(512, head_dim)

    def split(t):
        q = t[:, :num_heads * head_dim].view(num_tokens, num_heads, head_dim)
        k = t[:, num_heads * head_dim:(num_heads + num_kv_heads) * head_dim].view(num_tokens, num_kv_heads, head_dim)
        return q, k, t[:, (num_heads + num_kv_heads) * head_dim:]

    ref_qkv = qkv.clone()
    q_ref, k_ref, _ = split(ref_qkv)
    rotary_embedding_torch(positions, q_ref, k_ref, cache)
    q, k, v = split(qkv)
    v_before = v.clone()

    rotary_embedding_triton(positions, q, k, cache)

    assert torch.equal(v, v_before)
    assert_close(q, q_ref)
    assert_close(k, k_ref)


def test_reference_is_a_rotation(gen):
    # Position 0 is the identity and every position preserves each pair's norm, in float32 too
    # (the reference once corrupted the first half in place for float32 inputs).
    q = torch.randn(3, 2, 64, generator=gen)
    k = torch.randn(3, 1, 64, generator=gen)
    positions = torch.tensor([0, 7, 300])
    cache = cos_sin_cache(512, 64)
    for fn in (rotary_embedding_torch, rotary_embedding_triton):
        q2, k2 = q.clone(), k.clone()
        fn(positions, q2, k2, cache)
        assert torch.allclose(q2[0], q[0]) and torch.allclose(k2[0], k[0])
        pair_norm = lambda t: t[..., :32] ** 2 + t[..., 32:] ** 2  # noqa: E731
        assert torch.allclose(pair_norm(q2), pair_norm(q), atol=1e-5)
        assert not torch.allclose(q2[1:], q[1:])


def test_dispatch(gen):
    q = torch.randn(5, 4, 64, generator=gen)
    k = torch.randn(5, 2, 64, generator=gen)
    positions = torch.arange(5) * 3
    cache = cos_sin_cache(64, 64)
    q_ref, k_ref = q.clone(), k.clone()
    kernels.rotary_embedding(positions, q_ref, k_ref, cache)
    kernels.rotary_embedding(positions, q, k, cache, impl="triton")
    assert_close(q, q_ref)
    assert_close(k, k_ref)

"""Triton paged attention against the PyTorch reference, under the interpreter."""
from __future__ import annotations

import math

import pytest
import torch

import kernels
from kernels.paged_attention import paged_attention_torch
from kernels.triton import paged_attention as pa
from tests.kernels.helpers import assert_close


def make_batch(gen, seqs, *, num_heads, num_kv_heads, head_dim, block_size, dtype, spare_blocks=3,
               strided_q=False):
    """seqs: [(cached_before, q_len)]. Blocks are handed out in a random order and the rest of each
    block table row is -1, so reading a block the sequence does not own would show."""
    seq_lens = [c + n for c, n in seqs]
    blocks_per_seq = [-(-s // block_size) for s in seq_lens]
    width = max(blocks_per_seq) + 1
    num_blocks = sum(blocks_per_seq) + spare_blocks
    order = torch.randperm(num_blocks, generator=gen).tolist()
    block_tables = torch.full((len(seqs), width), -1, dtype=torch.int32)
    for i, n in enumerate(blocks_per_seq):
        block_tables[i, :n] = torch.tensor(order[:n], dtype=torch.int32)
        order = order[n:]
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(dtype)
    v_cache = torch.randn(shape, generator=gen).to(dtype)
    q_lens = [n for _, n in seqs]
    query_start_loc = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0).to(torch.int32)
    num_tokens = sum(q_lens)
    if strided_q:  # q as the leading slice of a fused qkv projection: rows are not contiguous
        qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, generator=gen).to(dtype)
        q = qkv[:, :num_heads * head_dim].view(num_tokens, num_heads, head_dim)
    else:
        q = torch.randn(num_tokens, num_heads, head_dim, generator=gen).to(dtype)
    return q, k_cache, v_cache, block_tables, torch.tensor(seq_lens, dtype=torch.int32), query_start_loc


def check(gen, seqs, *, num_heads, num_kv_heads, head_dim, block_size, dtype=torch.float32, num_splits=None,
          strided_q=False):
    q, k_cache, v_cache, block_tables, seq_lens, qsl = make_batch(
        gen, seqs, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, block_size=block_size,
        dtype=dtype, strided_q=strided_q)
    scale = 1.0 / math.sqrt(head_dim)
    ref = paged_attention_torch(q, k_cache, v_cache, block_tables, seq_lens, qsl, scale)
    inputs = [t.clone() for t in (q, k_cache, v_cache, block_tables, seq_lens, qsl)]
    out = pa.paged_attention_triton(q, k_cache, v_cache, block_tables, seq_lens, qsl, scale, num_splits=num_splits)
    for before, after in zip(inputs, (q, k_cache, v_cache, block_tables, seq_lens, qsl)):
        assert torch.equal(before, after), "an input was modified"
    assert_close(out, ref)


# (cached tokens before the step, new query tokens) per sequence: contexts end mid-block, exactly on
# a block boundary, and at 1; prefill chunks start from empty and from a cached prefix.
DECODE = [(0, 1), (15, 1), (16, 1), (47, 1), (70, 1)]
PREFILL = [(0, 37), (20, 13)]
MIXED = [(40, 1), (0, 19), (7, 1), (25, 30), (100, 1)]


@pytest.mark.parametrize("seqs,num_heads,num_kv_heads,head_dim,block_size,dtype", [
    (DECODE, 4, 2, 64, 16, torch.float32),
    (DECODE, 8, 8, 64, 32, torch.float16),
    (PREFILL, 8, 2, 64, 32, torch.float32),
    (MIXED, 8, 2, 128, 16, torch.float32),
    (MIXED, 4, 2, 128, 32, torch.bfloat16),
    (MIXED, 6, 2, 64, 16, torch.float32),      # group of 3: padded tile rows
    (MIXED, 4, 1, 64, 16, torch.float16),      # multi-query attention
], ids=["decode-f32-d64-bs16", "decode-f16-mha-bs32", "prefill-f32-bs32", "mixed-f32-d128-bs16",
        "mixed-bf16-d128-bs32", "mixed-group3", "mixed-mqa-f16"])
def test_matches_reference(poison, gen, seqs, num_heads, num_kv_heads, head_dim, block_size, dtype):
    check(gen, seqs, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, block_size=block_size,
          dtype=dtype)


@pytest.mark.parametrize("num_splits,dtype", [(3, torch.float32), (4, torch.bfloat16)])
def test_context_splits(poison, gen, num_splits, dtype):
    # A short sequence leaves some splits empty; prefill rows early in a chunk see no keys in
    # later splits. The merge must weigh both correctly and never read an unwritten partial.
    seqs = [(300, 1), (5, 1), (60, 20), (0, 9)]
    check(gen, seqs, num_heads=4, num_kv_heads=2, head_dim=64, block_size=16, dtype=dtype, num_splits=num_splits)


def test_heuristic_splits_long_context(poison, gen):
    # One long sequence leaves the unsplit grid nearly empty, so the heuristic must split it.
    seqs = [(700, 1)]
    assert pa._choose_num_splits(busy_programs=1, max_context=46 * 16, num_sms=16) > 1
    check(gen, seqs, num_heads=4, num_kv_heads=1, head_dim=64, block_size=16)


def test_heuristic_aims_for_two_waves():
    # 132 SMs (an H200): 64 sequences x 8 KV heads fill one wave of ~4 programs per SM but not two,
    # and two splits measured faster there; a grid of two waves or more is never split; a short
    # context is never cut below MIN_TOKENS_PER_SPLIT.
    assert pa._choose_num_splits(busy_programs=512, max_context=2048, num_sms=132) == 2
    assert pa._choose_num_splits(busy_programs=1056, max_context=2048, num_sms=132) == 1
    assert pa._choose_num_splits(busy_programs=8, max_context=8192, num_sms=132) == pa.MAX_SPLITS
    assert pa._choose_num_splits(busy_programs=8, max_context=2 * pa.MIN_TOKENS_PER_SPLIT, num_sms=132) == 2


def test_strided_q_and_empty_sequence(poison, gen):
    # A sequence with no new tokens this step (q_len 0) sits between two others.
    seqs = [(30, 1), (12, 0), (3, 17)]
    check(gen, seqs, num_heads=4, num_kv_heads=2, head_dim=64, block_size=16, strided_q=True)


def test_dispatch_forces_triton(poison, gen, monkeypatch):
    q, k_cache, v_cache, block_tables, seq_lens, qsl = make_batch(
        gen, MIXED[:3], num_heads=4, num_kv_heads=2, head_dim=64, block_size=16, dtype=torch.float32)
    calls = []
    real = pa.paged_attention_triton
    monkeypatch.setattr(pa, "paged_attention_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    out = kernels.paged_attention(q, k_cache, v_cache, block_tables, seq_lens, qsl, 0.125, impl="triton")
    assert calls, "impl='triton' did not reach the Triton kernel"
    assert_close(out, kernels.paged_attention(q, k_cache, v_cache, block_tables, seq_lens, qsl, 0.125))

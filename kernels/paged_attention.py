"""Paged attention over a block-table KV cache, for a mixed batch of decode rows and prefill chunks."""
from __future__ import annotations

import torch

from kernels._dispatch import resolve_impl


def _gather_context(cache: torch.Tensor, block_table: torch.Tensor, num_tokens: int) -> torch.Tensor:
    # cache: [num_blocks, block_size, num_kv_heads, head_dim] -> [num_tokens, num_kv_heads, head_dim]
    block_size = cache.shape[1]
    num_blocks = -(-num_tokens // block_size)
    return cache.index_select(0, block_table[:num_blocks]).flatten(0, 1)[:num_tokens]


def _attend(q, k, v, scale, causal_from: int | None):
    # q: [q_len, num_heads, head_dim]; k, v: [ctx, num_kv_heads, head_dim] (the sequence's cache).
    # Query i may see keys 0..causal_from + i (None: all keys, the decode case).
    q_len, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    group = num_heads // num_kv_heads
    qg = q.reshape(q_len, num_kv_heads, group, head_dim).float()
    scores = torch.einsum("qkgd,lkd->kgql", qg, k.float()) * scale   # [kv, group, q_len, ctx]
    if causal_from is not None:
        ctx = k.shape[0]
        q_pos = torch.arange(causal_from, causal_from + q_len, device=q.device)
        hidden = torch.arange(ctx, device=q.device)[None, :] > q_pos[:, None]   # [q_len, ctx]
        scores.masked_fill_(hidden, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("kgql,lkd->qkgd", probs, v.float())
    return out.reshape(q_len, num_heads, head_dim).to(q.dtype)


def paged_attention_torch(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale):
    """The reference (and CPU) path, one sequence at a time over exactly its own cached tokens:
    on a CPU, gathering padded batches costs more memory traffic than the per-sequence loop costs
    in dispatch."""
    out = torch.empty_like(q)
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    tables = block_tables.long()
    for i, seq_len in enumerate(lens):
        a, b = starts[i], starts[i + 1]
        if a == b:
            continue
        k = _gather_context(k_cache, tables[i], seq_len)
        v = _gather_context(v_cache, tables[i], seq_len)
        q_len = b - a
        out[a:b] = _attend(q[a:b], k, v, scale, None if q_len == 1 else seq_len - q_len)
    return out


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_tables: torch.Tensor, seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                    scale: float, impl: str | None = None) -> torch.Tensor:
    """q: [num_tokens, num_heads, head_dim] (the batch's new tokens, flat);
    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim];
    block_tables: [num_seqs, max_blocks_per_seq] int32; seq_lens: [num_seqs] int32 (cached tokens,
    new ones included); query_start_loc: [num_seqs + 1] int32. Returns [num_tokens, num_heads, head_dim]."""
    if resolve_impl(impl, q) == "triton":
        from kernels.triton.paged_attention import paged_attention_triton
        return paged_attention_triton(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale)
    return paged_attention_torch(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale)

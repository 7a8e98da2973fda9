"""Paged attention over a block-table KV cache, for a mixed batch of decode rows and prefill chunks."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels._dispatch import resolve_impl


def _gather_context(cache: torch.Tensor, block_table: torch.Tensor, num_tokens: int) -> torch.Tensor:
    # cache: [num_blocks, block_size, num_kv_heads, head_dim] -> [num_tokens, num_kv_heads, head_dim]
    block_size = cache.shape[1]
    num_blocks = -(-num_tokens // block_size)
    blocks = cache.index_select(0, block_table[:num_blocks].long())
    return blocks.flatten(0, 1)[:num_tokens]


def _decode_rows(q, k_cache, v_cache, block_tables, seq_lens, scale):
    # q: [n, num_heads, head_dim], one query token per sequence: the newest token attends to
    # the whole context, so no causal mask is needed, only the padding mask for shorter sequences.
    n, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    max_len = int(seq_lens.max())
    num_blocks = -(-max_len // block_size)
    tables = block_tables[:, :num_blocks].long()
    k = k_cache[tables].flatten(1, 2)[:, :max_len]  # [n, max_len, num_kv_heads, head_dim]
    v = v_cache[tables].flatten(1, 2)[:, :max_len]
    qg = q.view(n, num_kv_heads, group, head_dim).float()
    scores = torch.matmul(qg, k.permute(0, 2, 3, 1).float()) * scale  # [n, kv, group, max_len]
    pad = torch.arange(max_len, device=q.device)[None, :] >= seq_lens[:, None]
    scores.masked_fill_(pad[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs, v.permute(0, 2, 1, 3).float())  # [n, kv, group, head_dim]
    return out.reshape(n, num_heads, head_dim).to(q.dtype)


def _prefill_chunk(q, k_cache, v_cache, block_table, seq_len, scale):
    # q: [q_len, num_heads, head_dim], the last q_len tokens of a sequence of seq_len tokens:
    # query i sits at position seq_len - q_len + i and sees keys 0..that position.
    q_len, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    k = _gather_context(k_cache, block_table, seq_len)
    v = _gather_context(v_cache, block_table, seq_len)
    q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)
    allowed = torch.arange(seq_len, device=q.device)[None, :] <= q_pos[:, None]  # [q_len, seq_len]
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).float(), k.transpose(0, 1).float(), v.transpose(0, 1).float(),
        attn_mask=allowed, scale=scale, enable_gqa=num_heads != num_kv_heads)
    return out.transpose(0, 1).to(q.dtype)


def paged_attention_torch(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale):
    """The reference (and CPU) path: decode rows batched together, each prefill chunk on its own."""
    out = torch.empty_like(q)
    starts = query_start_loc.tolist()
    q_lens = [b - a for a, b in zip(starts, starts[1:])]
    decode = [i for i, n in enumerate(q_lens) if n == 1]
    if decode:
        rows = torch.tensor([starts[i] for i in decode], device=q.device)
        idx = torch.tensor(decode, device=q.device)
        out[rows] = _decode_rows(q[rows], k_cache, v_cache, block_tables[idx], seq_lens[idx], scale)
    lens = seq_lens.tolist()
    for i, n in enumerate(q_lens):
        if n > 1:
            a = starts[i]
            out[a:a + n] = _prefill_chunk(q[a:a + n], k_cache, v_cache, block_tables[i], lens[i], scale)
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

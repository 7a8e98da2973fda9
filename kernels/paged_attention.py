"""Paged attention over a block-table KV cache, for a mixed batch of decode rows and prefill chunks."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels._dispatch import resolve_impl


# Decode rows are batched in groups of similar context length, so padding stays small.
DECODE_GROUP = 16
# Up to this many KV heads, decode scores come from one batched matmul against a block-diagonal
# query (wasting kv_heads x the FLOPs, which are cheap here, to read the cache once, unpermuted).
BLOCK_DIAGONAL_MAX_KV_HEADS = 4
# On the CPU, prefill chunks over at most this many cached tokens (the chunk included) run in the
# compiled decode kernel, one query row per token, rather than through SDPA: 10-35% faster up to
# ~330 tokens and level at ~1,000 (SmolLM2's 9/3 heads, head dim 64, float32 and bfloat16, 2 threads).
PREFILL_IN_KERNEL_MAX_CONTEXT = 512


def _gather_context(cache: torch.Tensor, block_table: torch.Tensor, num_tokens: int) -> torch.Tensor:
    # cache: [num_blocks, block_size, num_kv_heads, head_dim] -> [num_tokens, num_kv_heads, head_dim]
    block_size = cache.shape[1]
    num_blocks = -(-num_tokens // block_size)
    return cache.index_select(0, block_table[:num_blocks]).flatten(0, 1)[:num_tokens]


def _prefill_chunk(q, k, v, scale, context_before: int):
    # q: [q_len, num_heads, head_dim], the chunk's queries at positions context_before + i;
    # k, v: [ctx, num_kv_heads, head_dim], the sequence's whole cache (the chunk included).
    q_len, num_heads, head_dim = q.shape
    ctx, num_kv_heads = k.shape[0], k.shape[1]
    group = num_heads // num_kv_heads
    qh = q.reshape(q_len, num_kv_heads, group, head_dim).permute(1, 0, 2, 3).reshape(num_kv_heads, q_len * group, head_dim)
    scores = torch.bmm(qh.float(), k.permute(1, 2, 0).float()) * scale      # [kv, q_len * group, ctx]
    hidden = torch.ones(q_len, ctx, dtype=torch.bool, device=q.device).triu_(context_before + 1)
    scores.view(num_kv_heads, q_len, group, ctx).masked_fill_(hidden[:, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.bmm(probs, v.permute(1, 0, 2).float())                       # [kv, q_len * group, head_dim]
    return out.view(num_kv_heads, q_len, group, head_dim).permute(1, 0, 2, 3).reshape(q_len, num_heads, head_dim)


def _decode_group(q, k_cache, v_cache, tables, lens: torch.Tensor, scale):
    # q: [m, num_heads, head_dim], one new token per sequence, attending to its whole context;
    # tables: [m, num_blocks] int64 covering the longest context; lens: [m].
    m, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    width = tables.shape[1] * block_size
    # table entries past a sequence's own blocks are padding (any value): read block 0 instead
    unused = torch.arange(tables.shape[1], device=q.device)[None, :] * block_size >= lens[:, None]
    flat = tables.masked_fill(unused, 0).reshape(-1)
    k = k_cache.index_select(0, flat).view(m, width, num_kv_heads * head_dim).float()   # [m, ctx, kv*head_dim]
    v = v_cache.index_select(0, flat).view(m, width, num_kv_heads * head_dim).float()
    qg = q.view(m, num_kv_heads, group, head_dim).float()
    pad = torch.arange(width, device=q.device)[None, :] >= lens[:, None]                  # [m, ctx]
    if num_kv_heads <= BLOCK_DIAGONAL_MAX_KV_HEADS:
        eye = torch.eye(num_kv_heads, dtype=qg.dtype, device=q.device)
        # [m, kv*group, kv*head_dim]: head h's queries in columns h*head_dim.., zeros elsewhere
        qbd = torch.einsum("mhgd,hj->mhgjd", qg, eye).reshape(m, num_kv_heads * group, num_kv_heads * head_dim)
        scores = torch.bmm(qbd, k.transpose(1, 2)) * scale                                # [m, kv*group, ctx]
        scores.masked_fill_(pad[:, None, :], float("-inf"))
        full = torch.bmm(torch.softmax(scores, dim=-1), v)                                # [m, kv*group, kv*head_dim]
        out = full.view(m, num_kv_heads, group, num_kv_heads, head_dim).diagonal(dim1=1, dim2=3)
        return out.permute(0, 3, 1, 2).reshape(m, num_heads, head_dim)
    kh = k.view(m, width, num_kv_heads, head_dim).permute(0, 2, 3, 1)                     # [m, kv, head_dim, ctx]
    scores = torch.matmul(qg, kh) * scale                                                 # [m, kv, group, ctx]
    scores.masked_fill_(pad[:, None, None, :], float("-inf"))
    out = torch.matmul(torch.softmax(scores, dim=-1), v.view(m, width, num_kv_heads, head_dim).transpose(1, 2))
    return out.reshape(m, num_heads, head_dim)


def _prefill_chunk_sdpa(q, k, v, scale, context_before: int):
    # As _prefill_chunk, through PyTorch's fused attention (flash attention on CPU: no q_len x ctx
    # score matrix, no float32 copies of bfloat16 inputs).
    q_len = q.shape[0]
    if context_before == 0:
        mask, causal = None, True
    else:   # query i sees keys 0 .. context_before + i
        mask = torch.ones(q_len, k.shape[0], dtype=torch.bool, device=q.device).tril_(context_before)
        causal = False
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], attn_mask=mask,
        is_causal=causal, scale=scale, enable_gqa=True)
    return out[0].transpose(0, 1)


def _prefill_rows(q, k_cache, v_cache, tables, lens: list[int], starts: list[int], scale, out,
                  chunk=_prefill_chunk, min_context: int = 0) -> None:
    """Each prefill chunk (more than one new token) over at least `min_context` cached tokens attends
    over exactly its own sequence's cache."""
    for i, seq_len in enumerate(lens):
        a, b = starts[i], starts[i + 1]
        if b - a > 1 and seq_len >= min_context:
            k = _gather_context(k_cache, tables[i], seq_len)
            v = _gather_context(v_cache, tables[i], seq_len)
            out[a:b] = chunk(q[a:b], k, v, scale, seq_len - (b - a)).to(q.dtype)


def paged_attention_torch(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale):
    """The reference path. Decode rows go in batched groups of similar length;
    each prefill chunk attends over exactly its own sequence's cache."""
    out = torch.empty_like(q)
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    tables = block_tables.long()
    block_size = k_cache.shape[1]
    decode = sorted((i for i in range(len(lens)) if starts[i + 1] - starts[i] == 1), key=lens.__getitem__)
    for g in range(0, len(decode), DECODE_GROUP):
        rows = decode[g:g + DECODE_GROUP]
        num_blocks = -(-lens[rows[-1]] // block_size)
        idx = torch.tensor(rows, device=q.device)
        token_rows = torch.tensor([starts[i] for i in rows], device=q.device)
        out[token_rows] = _decode_group(q[token_rows], k_cache, v_cache, tables[idx, :num_blocks],
                                        seq_lens[idx], scale).to(q.dtype)
    _prefill_rows(q, k_cache, v_cache, tables, lens, starts, scale, out)
    return out


@dataclass(slots=True)
class KernelRows:
    """The compiled kernel's rows of one step: row i is the query q[rows[i]] over the first lens[i]
    cached tokens of the sequence whose block table is tables[i]."""
    tables: torch.Tensor      # [count, blocks] int32
    lens: torch.Tensor        # [count] int32
    rows: torch.Tensor        # [count] int64
    count: int
    long_chunks: bool         # some prefill chunk is over a longer context: SDPA takes it


def kernel_rows(block_tables: torch.Tensor, lens: list[int], starts: list[int]) -> KernelRows:
    """Every decode row, and every token of a prefill chunk over at most PREFILL_IN_KERNEL_MAX_CONTEXT
    cached tokens, is one row of the compiled kernel: a chunk's token j is a query over the first
    (len - q_len + j + 1) cached tokens of its sequence, which is causal attention."""
    rows, seq_of, row_lens, long_chunks = [], [], [], False
    for i, seq_len in enumerate(lens):
        a, b = starts[i], starts[i + 1]
        if b - a == 1 or (b - a > 1 and seq_len <= PREFILL_IN_KERNEL_MAX_CONTEXT):
            rows.extend(range(a, b))
            seq_of.extend([i] * (b - a))
            row_lens.extend(range(seq_len - (b - a) + 1, seq_len + 1))
        elif b - a > 1:
            long_chunks = True
    tables = block_tables if seq_of == list(range(len(lens))) \
        else block_tables.index_select(0, torch.tensor(seq_of, dtype=torch.int64, device=block_tables.device))
    return KernelRows(tables.to(torch.int32).contiguous(), torch.tensor(row_lens, dtype=torch.int32),
                      torch.tensor(rows, dtype=torch.int64), len(rows), long_chunks)


def paged_attention_cpu(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale,
                        rows: KernelRows | None = None):
    """The CPU path: decode rows and short prefill chunks in the compiled kernel (kernels/cpu_kernels.py:
    straight from the paged cache, no gather; `kernel_rows`), longer prefill chunks through PyTorch's
    fused attention. `rows`: this step's `kernel_rows`, when the caller computed them once for
    every layer."""
    from kernels import cpu_kernels

    if not cpu_kernels.q_rows_ok(q):
        q = q.contiguous()
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    if rows is None:
        rows = kernel_rows(block_tables, lens, starts)
    if rows.count:
        cpu_kernels.paged_decode(q, k_cache, v_cache, rows.tables, rows.lens, rows.rows, scale, out)
    if rows.long_chunks:
        _prefill_rows(q, k_cache, v_cache, block_tables.long(), lens, starts, scale, out, _prefill_chunk_sdpa,
                      min_context=PREFILL_IN_KERNEL_MAX_CONTEXT + 1)
    return out


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_tables: torch.Tensor, seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                    scale: float, impl: str | None = None, rows: KernelRows | None = None) -> torch.Tensor:
    """q: [num_tokens, num_heads, head_dim] (the batch's new tokens, flat);
    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim];
    block_tables: [num_seqs, max_blocks_per_seq] int32; seq_lens: [num_seqs] int32 (cached tokens,
    new ones included); query_start_loc: [num_seqs + 1] int32. Returns [num_tokens, num_heads, head_dim].
    rows: on the CPU, the step's `kernel_rows` (the same for every layer), else computed here."""
    which = resolve_impl(impl, q)
    if which == "triton":
        from kernels.triton.paged_attention import paged_attention_triton
        return paged_attention_triton(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale)
    if which == "cpu":
        from kernels import cpu_kernels

        if cpu_kernels.supports(q, k_cache) and (impl == "cpu" or cpu_kernels.available()):
            return paged_attention_cpu(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, rows)
        if impl == "cpu":
            raise ValueError(f"impl='cpu' takes CPU float32/bfloat16 tensors, got {q.dtype} on {q.device}")
    return paged_attention_torch(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale)

"""Triton paged attention for a mixed batch: decode rows and prefill chunks in one kernel.

Grid: (query tile, kv head, context split). A query tile is up to BLOCK_Q consecutive query tokens
of one sequence times the GROUP query heads that share a kv head (grouped-query attention), laid
out as BLOCK_M = BLOCK_Q * GROUP (padded) rows so both matmuls run on tensor cores. Each program
walks its sequence's block table TILE_N keys at a time with an online softmax in float32. Query i
of a chunk of q_len tokens sits at absolute position seq_len - q_len + i and sees keys 0..position,
so decode rows (q_len = 1) and prefill chunks share one code path.

Sequences are found without a host sync: tile t of sequence s gets program id
query_start_loc[s] // BLOCK_Q + s + t. These ranges never overlap, their union fits in
num_tokens // BLOCK_Q + num_seqs programs, and a program finds its sequence by binary search
over query_start_loc; ids that fall in the gaps exit at once.

With NUM_SPLITS > 1 (long contexts, few programs) each program covers one slice of the context and
writes its partial (max, sum, acc); a second kernel merges the slices (flash-decoding).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels.triton import _utils

MIN_TOKENS_PER_SPLIT = 256
MAX_SPLITS = 16


@triton.jit
def _find_sequence(qsl_ptr, tile, num_seqs, BLOCK_Q: tl.constexpr):
    """The last sequence s whose first tile id, query_start_loc[s] // BLOCK_Q + s, is <= tile."""
    lo = tile * 0
    hi = lo + num_seqs
    while hi - lo > 1:
        mid = (lo + hi) // 2
        first_tile = tl.load(qsl_ptr + mid) // BLOCK_Q + mid
        right = first_tile <= tile
        lo = tl.where(right, mid, lo)
        hi = tl.where(right, hi, mid)
    return lo


@triton.jit
def _paged_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, qsl_ptr,
    out_ptr, m_ptr, l_ptr, acc_ptr,
    qk_scale, num_seqs, num_tokens, num_heads,
    stride_qt, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_bt,
    stride_ot, stride_oh, stride_od,
    GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, TILE_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    seq = _find_sequence(qsl_ptr, tile, num_seqs, BLOCK_Q)
    q_start = tl.load(qsl_ptr + seq)
    q_len = tl.load(qsl_ptr + seq + 1) - q_start
    tile_in_seq = tile - (q_start // BLOCK_Q + seq)
    if tile_in_seq * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context_before = seq_len - q_len

    # Row r of the tile: query token tile_in_seq * BLOCK_Q + r // GROUP, head r % GROUP of the group.
    rows = tl.arange(0, BLOCK_M)
    tok = tile_in_seq * BLOCK_Q + rows // GROUP                        # [BLOCK_M] index in the chunk
    row_valid = (rows < BLOCK_Q * GROUP) & (tok < q_len)
    head = kv_head * GROUP + rows % GROUP                              # [BLOCK_M]
    q_pos = context_before + tok                                       # absolute position
    token = (q_start + tok).to(tl.int64)                               # row in q / out
    dims = tl.arange(0, HEAD_DIM_PAD)
    if HEAD_DIM == HEAD_DIM_PAD:
        row_mask = row_valid[:, None]
    else:
        row_mask = row_valid[:, None] & (dims[None, :] < HEAD_DIM)
    q = tl.load(q_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :] * stride_qd,
                mask=row_mask, other=0.0)                              # [BLOCK_M, HEAD_DIM_PAD]
    q = q.to(k_cache_ptr.dtype.element_ty)
    if DOT_IN_FP32:
        q = q.to(tl.float32)

    # Keys this tile can see end at its last query's position; a split takes a TILE_N-aligned slice.
    kv_end = context_before + tl.minimum(q_len, (tile_in_seq + 1) * BLOCK_Q)
    if NUM_SPLITS == 1:
        kv_lo = 0
        kv_hi = kv_end
    else:
        per_split = tl.cdiv(tl.cdiv(kv_end, NUM_SPLITS), TILE_N) * TILE_N
        kv_lo = split * per_split
        kv_hi = tl.minimum(kv_lo + per_split, kv_end)

    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    k_head = k_cache_ptr + kv_head * stride_kh
    v_head = v_cache_ptr + kv_head * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)               # running max, log2 domain
    l_i = tl.zeros([BLOCK_M], tl.float32)                              # running sum of exp2
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)
    for start in range(kv_lo, kv_hi, TILE_N):
        keys = start + tl.arange(0, TILE_N)                            # [TILE_N] absolute positions
        key_valid = keys < kv_hi
        # int64: block id * block stride overflows int32 on large caches.
        block = tl.load(table + keys // BLOCK_SIZE, mask=key_valid, other=0).to(tl.int64)
        within = keys % BLOCK_SIZE
        if HEAD_DIM == HEAD_DIM_PAD:
            kv_mask = key_valid[:, None]
        else:
            kv_mask = key_valid[:, None] & (dims[None, :] < HEAD_DIM)
        k = tl.load(k_head + (block * stride_kb + within * stride_ks)[:, None] + dims[None, :] * stride_kd,
                    mask=kv_mask, other=0.0)                           # [TILE_N, HEAD_DIM_PAD]
        if DOT_IN_FP32:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale   # [BLOCK_M, TILE_N]
        visible = row_valid[:, None] & key_valid[None, :] & (keys[None, :] <= q_pos[:, None])
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # Rows that have seen no key yet keep m = -inf; subtract 0 instead so exp2 gives 0, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_head + (block * stride_vb + within * stride_vs)[:, None] + dims[None, :] * stride_vd,
                    mask=kv_mask, other=0.0)                           # [TILE_N, HEAD_DIM_PAD]
        p = p.to(v.dtype)  # tensor cores take P in the cache dtype, as flash attention does
        if DOT_IN_FP32:
            p = p.to(tl.float32)
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=DOT_PRECISION)
        m_i = m_new

    if NUM_SPLITS == 1:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(out_ptr + token[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :] * stride_od,
                 out.to(out_ptr.dtype.element_ty), mask=row_mask)
    else:
        # Partials: m, l [NUM_SPLITS, num_tokens, num_heads]; acc [NUM_SPLITS, num_tokens, num_heads, HEAD_DIM]
        # A 64-bit scalar base for this tile's first row, 32-bit offsets within the tile.
        base = (split * num_tokens + q_start + tile_in_seq * BLOCK_Q).to(tl.int64) * num_heads
        local = (rows // GROUP) * num_heads + head                     # [BLOCK_M] int32
        tl.store(m_ptr + base + local, m_i, mask=row_valid)
        tl.store(l_ptr + base + local, l_i, mask=row_valid)
        tl.store(acc_ptr + base * HEAD_DIM + local[:, None] * HEAD_DIM + dims[None, :], acc, mask=row_mask)


@triton.jit
def _merge_splits_kernel(
    m_ptr, l_ptr, acc_ptr, out_ptr,
    num_tokens, num_heads,
    stride_ot, stride_oh, stride_od,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr,
):
    # One program per (token, kv head): merges the partials of the GROUP query heads sharing it.
    token = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    splits = tl.arange(0, SPLITS_PAD)
    g = tl.arange(0, GROUP_PAD)
    dims = tl.arange(0, HEAD_DIM_PAD)
    head = kv_head * GROUP + g                                            # [GROUP_PAD]
    head_valid = g < GROUP
    valid = (splits < NUM_SPLITS)[:, None] & head_valid[None, :]         # [SPLITS_PAD, GROUP_PAD]
    idx = (splits[:, None] * num_tokens + token) * num_heads + head[None, :]
    m = tl.load(m_ptr + idx, mask=valid, other=float("-inf"))
    l = tl.load(l_ptr + idx, mask=valid, other=0.0)
    m_max = tl.max(m, 0)                                                  # [GROUP_PAD]
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.exp2(m - m_max[None, :])                                       # 0 for splits that saw no key
    denom = tl.sum(w * l, 0)
    denom = tl.where(denom == 0.0, 1.0, denom)
    dim_valid = dims < HEAD_DIM
    acc = tl.load(acc_ptr + idx[:, :, None] * HEAD_DIM + dims[None, None, :],
                  mask=valid[:, :, None] & dim_valid[None, None, :], other=0.0)   # [S, G, D]
    out = tl.sum(acc * w[:, :, None], 0) / denom[:, None]                 # [GROUP_PAD, HEAD_DIM_PAD]
    tl.store(out_ptr + token * stride_ot + head[:, None] * stride_oh + dims[None, :] * stride_od,
             out.to(out_ptr.dtype.element_ty), mask=head_valid[:, None] & dim_valid[None, :])


def paged_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                           scale: float, num_splits: int | None = None) -> torch.Tensor:
    """Same contract as kernels.paged_attention. `num_splits` overrides the context-split heuristic
    (tests and benchmarks use it); nothing here reads device data back to the host."""
    num_tokens, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    num_seqs = seq_lens.shape[0]
    assert num_heads % num_kv_heads == 0, (num_heads, num_kv_heads)
    assert v_cache.shape == k_cache.shape and k_cache.shape[3] == head_dim
    assert query_start_loc.shape == (num_seqs + 1,) and block_tables.shape[0] == num_seqs
    assert block_tables.stride(1) == 1
    out = _utils.empty((num_tokens, num_heads, head_dim), q.dtype, q.device)
    if num_tokens == 0 or num_seqs == 0:
        return out

    group = num_heads // num_kv_heads
    decode_only = num_tokens == num_seqs  # one token per sequence, unless some have none
    cfg = _launch_config(decode_only, group, head_dim, k_cache.dtype)
    block_q = cfg["BLOCK_M"] // group
    num_tiles = num_tokens // block_q + num_seqs  # bound on tile ids; see the module docstring
    if num_splits is None:
        busy = (num_seqs if decode_only else triton.cdiv(num_tokens, block_q)) * num_kv_heads
        max_context = block_tables.shape[1] * block_size
        num_splits = _choose_num_splits(busy, max_context, _utils.num_sms(q.device))
    assert 1 <= num_splits

    head_dim_pad = max(16, _utils.next_pow2(head_dim))
    if num_splits == 1:
        m = l = acc = out  # unused
    else:
        m = _utils.empty((num_splits, num_tokens, num_heads), torch.float32, q.device)
        l = _utils.empty((num_splits, num_tokens, num_heads), torch.float32, q.device)
        acc = _utils.empty((num_splits, num_tokens, num_heads, head_dim), torch.float32, q.device)
    _paged_attention_kernel[(num_tiles, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
        out, m, l, acc,
        scale * math.log2(math.e), num_seqs, num_tokens, num_heads,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), block_tables.stride(0), *out.stride(),
        GROUP=group, BLOCK_SIZE=block_size, HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad,
        BLOCK_Q=block_q, NUM_SPLITS=num_splits,
        # float32 models get exact float32 products; tf32 would cost ~1e-3 relative error.
        DOT_PRECISION="ieee" if k_cache.dtype == torch.float32 else "tf32",
        # Off CUDA Triton runs in its interpreter, whose tl.dot multiplies bfloat16 operands as
        # their raw uint16 bits; the same products taken in float32 are exact there.
        DOT_IN_FP32=not q.is_cuda,
        **cfg,
    )
    if num_splits > 1:
        splits_pad, group_pad = _utils.next_pow2(num_splits), _utils.next_pow2(group)
        _merge_splits_kernel[(num_tokens, num_kv_heads)](
            m, l, acc, out, num_tokens, num_heads, *out.stride(),
            GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad,
            NUM_SPLITS=num_splits, SPLITS_PAD=splits_pad,
            num_warps=4 if splits_pad * group_pad * head_dim_pad >= 4096 else 2,
        )
    return out


def _launch_config(decode_only: bool, group: int, head_dim: int, dtype: torch.dtype) -> dict:
    """Tile shapes per case, chosen from ptxas register/shared-memory reports for sm_90
    (tests/kernels/gpu_compile.py): all pipeline their loads with cp.async and none spills more
    than a few bytes.
    Decode rows carry one query token, so a 16-row tile (the tensor-core minimum) holds its GQA
    group; prefill tiles take 64 rows. float32 dots run on FMA units and need smaller tiles."""
    min_rows = 16 if decode_only else (64 if dtype != torch.float32 else 32)
    rows = max(min_rows, _utils.next_pow2(group))
    if dtype == torch.float32:
        return {"BLOCK_M": rows, "TILE_N": 32 if decode_only else 16, "num_warps": 8,
                "num_stages": 3 if decode_only else 2}
    return {"BLOCK_M": rows, "TILE_N": 64 if head_dim <= 128 else 32, "num_warps": 4, "num_stages": 3}


def _choose_num_splits(busy_programs: int, max_context: int, num_sms: int) -> int:
    """Split the context until the grid holds about two waves of resident programs (few
    sequences, long contexts), no slice shorter than MIN_TOKENS_PER_SPLIT. Measured on an H200
    (benchmarks/kernels.py, decode b64 ctx2048, 512 programs against 528 resident): one wave
    reached 69% of copy bandwidth, two splits 86%, four 83% -- a single wave leaves SMs idle at
    its tail and too few loads in flight. A grid that already fills two waves gains nothing from
    splitting but pays for the partials and the merge."""
    target = 2 * 4 * num_sms  # ~4 decode programs resident per SM at ~128 registers, 39 KB smem
    if busy_programs >= target:
        return 1
    by_length = max(1, max_context // MIN_TOKENS_PER_SPLIT)
    return max(1, min(target // busy_programs, by_length, MAX_SPLITS))

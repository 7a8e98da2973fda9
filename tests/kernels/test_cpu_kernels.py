"""The compiled CPU decode kernel (kernels/cpu_kernels.py) against the PyTorch reference."""
from __future__ import annotations

import importlib
import math

import pytest
import torch

import kernels
from kernels import cpu_kernels
from kernels.paged_attention import paged_attention_cpu, paged_attention_torch
from tests.kernels.helpers import assert_close, rel_err
from tests.kernels.test_paged_attention import DECODE, MIXED, make_batch

linear_module = importlib.import_module("kernels.linear")

if not cpu_kernels.available():
    pytest.skip("no C compiler here: the engine runs the PyTorch path", allow_module_level=True)


@pytest.fixture(params=["native", "avx2"])
def build(request, monkeypatch):
    """The kernels as the engine builds them here (-march=native), and built without AVX-512
    (-mno-avx512f) where the CPU has it: so the AVX2 paths are checked on every CPU these tests run
    on, not only on those that lack AVX-512."""
    if request.param == "avx2":
        flags = set(cpu_kernels._cpu_flags().split())
        if not {"avx2", "fma"} <= flags:
            pytest.skip("needs AVX2 and FMA")
        if "avx512f" not in flags:
            pytest.skip("without AVX-512 the native build is the AVX2 one")
        try:
            lib = cpu_kernels.build_variant("-mno-avx512f")
        except cpu_kernels.KernelBuildError as exc:   # a compiler whose -march=native implies AVX-512 (AVX10)
            pytest.skip(f"this compiler cannot build the kernels without AVX-512 here: {str(exc)[:200]}")
        assert lib.genq_linear_native_bf16() == 0, "the build without AVX-512 still has the AVX512-BF16 path"
        monkeypatch.setattr(cpu_kernels, "library", lambda: lib)
    return request.param


def run_both(gen, seqs, threads=1, **shape):
    q, k_cache, v_cache, block_tables, seq_lens, qsl = make_batch(gen, seqs, **shape)
    scale = 1.0 / math.sqrt(shape["head_dim"])
    ref = paged_attention_torch(q, k_cache, v_cache, block_tables, seq_lens, qsl, scale)
    inputs = [t.clone() for t in (q, k_cache, v_cache, block_tables, seq_lens, qsl)]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = paged_attention_cpu(q, k_cache, v_cache, block_tables, seq_lens, qsl, scale)
    finally:
        torch.set_num_threads(before)
    for old, new in zip(inputs, (q, k_cache, v_cache, block_tables, seq_lens, qsl)):
        assert torch.equal(old, new), "an input was modified"
    return out, ref


LONG = [(0, 1), (15, 1), (16, 1), (47, 1), (300, 1), (129, 1), (2, 1), (64, 1)]
# Prefill chunks both sides of PREFILL_IN_KERNEL_MAX_CONTEXT (512): short ones (first chunks and
# continuations) run in the compiled kernel a token a row, long ones through SDPA; beside decode rows
# and a sequence with no new token.
PREFILL_BOTH_WAYS = [(0, 40), (30, 1), (450, 62), (500, 13), (0, 0), (480, 40), (600, 25), (8, 1), (0, 513)]


@pytest.mark.parametrize("seqs,num_heads,num_kv_heads,head_dim,block_size,dtype,threads", [
    (DECODE, 4, 2, 64, 16, torch.float32, 1),
    (DECODE, 9, 3, 64, 16, torch.bfloat16, 1),      # SmolLM2's shape
    (MIXED, 8, 8, 32, 4, torch.float32, 2),         # MHA, small blocks, prefill chunks in between
    (MIXED, 4, 1, 128, 16, torch.bfloat16, 2),      # MQA, head_dim 128
    (LONG, 6, 2, 64, 1, torch.float32, 2),          # block size 1
    (LONG, 12, 4, 16, 32, torch.float32, 3),        # more threads than the work splits evenly into
    (LONG, 28, 2, 128, 8, torch.float32, 2),        # 14 query heads a KV head (AVX-512 path: groups of 6, 6, 2)
    (LONG, 10, 2, 192, 16, torch.float32, 1),       # head_dim 192: not the AVX-512 path's 64 or 128
    (PREFILL_BOTH_WAYS, 9, 3, 64, 16, torch.float32, 2),
    (PREFILL_BOTH_WAYS, 9, 3, 64, 16, torch.bfloat16, 2),
    # prefill rows in tiles of 16 (head_dim 64): one query head a KV head, and 8 (a tile's 128 queries
    # weighed six at a time), blocks that do not hold a whole 16-token chunk (5, 1), one thread and three
    (PREFILL_BOTH_WAYS, 4, 4, 64, 5, torch.float32, 3),
    (PREFILL_BOTH_WAYS, 8, 1, 64, 1, torch.bfloat16, 1),
    ([(0, 17), (3, 33), (40, 16), (0, 2), (0, 1), (7, 1)], 6, 2, 64, 16, torch.float32, 2),
    # decode rows of four sequences whose contexts grow by one, as a chunk's rows do: not one tile
    ([(10, 1), (11, 1), (12, 1), (13, 1)], 9, 3, 64, 16, torch.float32, 1),
    ([(0, 20)], 9, 3, 64, 16, torch.float32, 3),        # two tiles for three threads: one item per KV head
    ([(0, 21), (5, 1)], 64, 1, 64, 16, torch.bfloat16, 2),   # 64 query heads a KV head: 1,024 queries a tile
    # decode rows enough to give each its own item over every KV head (AVX2: all heads read together),
    # 8-token chunks across 5-token blocks, contexts of 1 to 301 tokens
    (LONG, 9, 3, 64, 5, torch.float32, 2),
    # the same in bfloat16 (AVX-512 with AMX: each 16-token chunk of every head copied before it is
    # read, across 5-token blocks), and head_dim 128 with 7 query heads a KV head (weighed 6 and 1)
    (LONG, 9, 3, 64, 5, torch.bfloat16, 2),
    (LONG, 14, 2, 128, 16, torch.bfloat16, 1),
    # bfloat16 tiles whose scores go to the tile unit where there is AMX: 4 query heads a KV head (64
    # queries a full tile, 5-token blocks) and one (16 queries)
    (PREFILL_BOTH_WAYS, 8, 2, 64, 5, torch.bfloat16, 2),
    (PREFILL_BOTH_WAYS, 4, 4, 64, 16, torch.bfloat16, 1),
], ids=["decode-f32", "decode-bf16-smollm2", "mixed-mha-bs4-2threads", "mixed-mqa-bf16-d128", "long-bs1",
        "long-3threads", "long-g14-d128", "long-d192", "prefill-short-and-long-f32", "prefill-short-and-long-bf16",
        "prefill-tiles-mha-bs5", "prefill-tiles-g8-bs1-bf16", "prefill-tile-edges", "decode-rows-like-a-chunk",
        "prefill-tiles-per-kv-head", "prefill-tile-g64-bf16", "decode-rows-all-heads-bs5",
        "decode-rows-all-heads-bs5-bf16", "decode-rows-all-heads-d128-g7-bf16",
        "prefill-tiles-g4-bs5-bf16", "prefill-tiles-mha-bf16"])
@pytest.mark.usefixtures("build")
def test_matches_reference(gen, seqs, num_heads, num_kv_heads, head_dim, block_size, dtype, threads):
    out, ref = run_both(gen, seqs, threads, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                        block_size=block_size, dtype=dtype)
    assert_close(out, ref)
    if dtype == torch.float32:     # exact softmax in float32 both ways: only summation order differs
        assert (out - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("block_size,head_dim,num_heads,num_kv_heads", [(5, 64, 9, 3), (16, 128, 14, 2), (1, 64, 4, 4)])
def test_decode_rows_copied_a_chunk_at_a_time_give_the_same_bits(gen, block_size, head_dim, num_heads, num_kv_heads):
    # run_row_avx512 (a bfloat16 row's cache copied 16 tokens at a time, every head together) against
    # the build that reads the cache head by head (run_item_avx512): the same sums in the same order
    # (the scores by vdpbf16ps in both: row_scores_amx, the tile unit's, sums in another order).
    # One thread: 8 rows are then enough for each to be an item over every KV head (the copying path).
    if "avx512f" not in cpu_kernels._cpu_flags().split():
        pytest.skip("the copying path is AVX-512's")
    copying = cpu_kernels.build_variant("-DGENQ_ROW_SWEEP=1", "-DGENQ_NO_ROW_AMX")
    direct = cpu_kernels.build_variant("-DGENQ_ROW_SWEEP=0")
    batch = make_batch(gen, LONG, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                       block_size=block_size, dtype=torch.bfloat16)
    outs = [_decode_rows_one_thread(lib, batch, num_heads, num_kv_heads, head_dim, block_size)
            for lib in (copying, direct)]
    assert not outs[0].isnan().any()
    assert torch.equal(outs[0], outs[1])


def _decode_rows_one_thread(lib, batch, num_heads, num_kv_heads, head_dim, block_size):
    """genq_paged_decode of `lib` on `batch` (make_batch's, of LONG), one token a sequence, one thread."""
    q, k_cache, v_cache, block_tables, seq_lens, _ = batch
    tables = block_tables.to(torch.int32).contiguous()
    lens = seq_lens.to(torch.int32).contiguous()
    rows = torch.arange(len(LONG), dtype=torch.int64)
    out = torch.full_like(q, float("nan"))
    status = lib.genq_paged_decode(q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(),
                                   out.data_ptr(), 1, tables.data_ptr(), tables.stride(0), lens.data_ptr(),
                                   rows.data_ptr(), len(LONG), num_heads, num_kv_heads, head_dim, block_size,
                                   1.0 / math.sqrt(head_dim), 1)
    assert status == 0
    return out


@pytest.mark.parametrize("block_size,head_dim,num_heads,num_kv_heads", [(5, 64, 9, 3), (16, 64, 9, 3),
                                                                        (16, 128, 14, 2), (1, 64, 4, 4)])
def test_bfloat16_decode_row_scores_on_the_tile_unit_match_the_vector_path(gen, block_size, head_dim, num_heads,
                                                                           num_kv_heads):
    # With AMX a bfloat16 decode row's scores come from TDPBF16PS, K as the A operand straight from the
    # copied chunk (row_scores_amx); without, from vdpbf16ps. Both within bfloat16's rounding of the exact
    # result (float64 on the same inputs), and of each other; every output written.
    if "amx_bf16" not in cpu_kernels._cpu_flags().split() or not cpu_kernels.linear_amx():
        pytest.skip("needs AMX-BF16 (and Linux lending the tiles)")
    batch = make_batch(gen, LONG, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                       block_size=block_size, dtype=torch.bfloat16)
    q, k_cache, v_cache, block_tables, seq_lens, qsl = batch
    exact = paged_attention_torch(q.double(), k_cache.double(), v_cache.double(), block_tables, seq_lens, qsl,
                                  1.0 / math.sqrt(head_dim))
    tiles, vectors = (_decode_rows_one_thread(lib, batch, num_heads, num_kv_heads, head_dim, block_size)
                      for lib in (cpu_kernels.build_variant("-DGENQ_ROW_SWEEP=1"),
                                  cpu_kernels.build_variant("-DGENQ_ROW_SWEEP=1", "-DGENQ_NO_ROW_AMX")))
    assert not tiles.isnan().any()
    assert rel_err(tiles, exact) < 4e-3 and rel_err(vectors, exact) < 4e-3   # bfloat16 output: ~2^-9
    assert rel_err(tiles, vectors) < 4e-3


@pytest.mark.parametrize("num_heads,num_kv_heads,block_size", [(9, 3, 16), (8, 2, 5), (4, 4, 1)])
def test_bfloat16_tile_scores_on_the_tile_unit_match_the_vector_path(gen, num_heads, num_kv_heads, block_size):
    # Prefill tiles of a bfloat16 cache: with AMX their scores come from TDPBF16PS (tile_scores_amx),
    # else from widened float32 multiply-adds; both within bfloat16's rounding of the reference (PyTorch
    # in float32 on the same inputs), and of each other
    if "amx_bf16" not in cpu_kernels._cpu_flags().split() or not cpu_kernels.linear_amx():
        pytest.skip("needs AMX-BF16 (and Linux lending the tiles)")
    q, k_cache, v_cache, block_tables, seq_lens, qsl = make_batch(
        gen, PREFILL_BOTH_WAYS, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=64,
        block_size=block_size, dtype=torch.bfloat16)
    exact = paged_attention_torch(q.double(), k_cache.double(), v_cache.double(), block_tables, seq_lens, qsl, 0.125)
    outs = {}
    for name, lib in (("tiles", cpu_kernels.library()), ("vectors", cpu_kernels.build_variant("-DGENQ_NO_TILE_AMX"))):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(cpu_kernels, "library", lambda lib=lib: lib)
            outs[name] = paged_attention_cpu(q, k_cache, v_cache, block_tables, seq_lens, qsl, 0.125)
        assert rel_err(outs[name], exact) < 4e-3, name   # bfloat16 output: ~2^-9 relative rounding
    assert rel_err(outs["tiles"], outs["vectors"]) < 4e-3


@pytest.mark.parametrize("flags", [(), ("-mno-avx512f",)], ids=["build", "no-avx512"])
def test_argmax_rows_is_the_first_maximum_as_torch_has_it(gen, flags):
    # greedy sampling's pick: every width around the 16-lane steps, ties (the first wins), NaN (the
    # first NaN wins) before, inside and after the vector part, infinities, -0.0 against 0.0
    lib = cpu_kernels.build_variant(*flags)
    for cols in (1, 2, 15, 16, 17, 31, 32, 33, 100, 49152):
        rows = torch.randint(0, 3, (9, cols), generator=gen).float()
        rows[1] = float("-inf")
        rows[2, cols // 2] = float("nan")
        rows[3, cols - 1] = float("nan")
        rows[4, 0] = float("nan")
        rows[5, [0, cols - 1]] = float("inf")
        rows[6] = 0.0
        rows[6, cols // 3] = -0.0
        rows[7] = torch.randn(cols, generator=gen)
        for x in (rows, rows[:, : max(1, cols - 3)]):   # contiguous, and rows further apart than their length
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(cpu_kernels, "library", lambda: lib)
                assert cpu_kernels.argmax_rows(x) == x.max(dim=-1).indices.tolist(), cols
    with pytest.raises(ValueError, match="argmax_rows"):
        cpu_kernels.argmax_rows(torch.zeros(2, 3, dtype=torch.bfloat16))


def test_strided_q_and_an_empty_sequence(gen):
    out, ref = run_both(gen, [(30, 1), (12, 0), (3, 17), (8, 1)], num_heads=4, num_kv_heads=2, head_dim=64,
                        block_size=16, dtype=torch.float32, strided_q=True)
    assert_close(out, ref)


def test_dispatch_picks_the_kernel_on_cpu(gen, monkeypatch):
    q, k_cache, v_cache, block_tables, seq_lens, qsl = make_batch(
        gen, DECODE, num_heads=4, num_kv_heads=2, head_dim=64, block_size=16, dtype=torch.float32)
    calls = []
    real = cpu_kernels.paged_decode
    monkeypatch.setattr(cpu_kernels, "paged_decode", lambda *a, **k: calls.append(1) or real(*a, **k))
    out = kernels.paged_attention(q, k_cache, v_cache, block_tables, seq_lens, qsl, 0.125)
    assert calls, "the default CPU path did not reach the compiled kernel"
    forced = kernels.paged_attention(q, k_cache, v_cache, block_tables, seq_lens, qsl, 0.125, impl="torch")
    assert len(calls) == 1, "impl='torch' must not use the compiled kernel"
    assert_close(out, forced)


def test_float16_falls_back_and_forcing_it_is_a_clear_error(gen):
    q, k_cache, v_cache, block_tables, seq_lens, qsl = make_batch(
        gen, MIXED, num_heads=4, num_kv_heads=2, head_dim=64, block_size=16, dtype=torch.float16)
    out = kernels.paged_attention(q, k_cache, v_cache, block_tables, seq_lens, qsl, 0.125)   # PyTorch path
    assert_close(out, paged_attention_torch(q, k_cache, v_cache, block_tables, seq_lens, qsl, 0.125))
    with pytest.raises(ValueError, match="impl='cpu'"):
        kernels.paged_attention(q, k_cache, v_cache, block_tables, seq_lens, qsl, 0.125, impl="cpu")


def _build_in(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(cpu_kernels, "_build_dir", None)   # restored after the test
    cpu_kernels.set_cache_dir(tmp_path / "kernels")


def test_build_is_cached_and_keyed_by_source(tmp_path, monkeypatch):
    _build_in(tmp_path, monkeypatch)
    compiler = cpu_kernels._compiler()
    first = cpu_kernels._build(compiler)
    assert first.exists() and first.parent == tmp_path / "kernels"
    mtime = first.stat().st_mtime_ns
    assert cpu_kernels._build(compiler) == first and first.stat().st_mtime_ns == mtime   # not rebuilt
    changed = tmp_path / "cpu_kernels.c"
    changed.write_text(cpu_kernels.SOURCE.read_text() + "\n/* changed */\n")
    monkeypatch.setattr(cpu_kernels, "SOURCE", changed)
    assert cpu_kernels._build(compiler) != first


def test_a_broken_build_is_a_typed_error(tmp_path, monkeypatch):
    _build_in(tmp_path, monkeypatch)
    broken = tmp_path / "cpu_kernels.c"
    broken.write_text("this is not C\n")
    monkeypatch.setattr(cpu_kernels, "SOURCE", broken)
    with pytest.raises(cpu_kernels.KernelBuildError, match="failed"):
        cpu_kernels._build(cpu_kernels._compiler())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("rows,hidden", [(37, 576), (5, 100), (120, 1000)])   # tails of 4 and 8; 2 threads
@pytest.mark.usefixtures("build")
def test_rms_norm_matches_reference(gen, dtype, with_residual, rows, hidden):
    from kernels.rms_norm import rms_norm_torch

    x = torch.randn(rows, hidden, generator=gen).to(dtype)
    weight = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(dtype)
    residual = torch.randn(rows, hidden, generator=gen).to(dtype) if with_residual else None
    before = None if residual is None else residual.clone()
    got = cpu_kernels.rms_norm(x, weight, 1e-5, residual)
    want = rms_norm_torch(x, weight, 1e-5, residual)
    if with_residual:
        assert torch.equal(got[1], want[1]), "the new residual is x + residual, rounded as PyTorch rounds"
        assert torch.equal(residual, before), "the old residual must not be modified"
        got, want = got[0], want[0]
    assert_close(got, want)
    if dtype == torch.float32:
        assert (got - want).abs().max().item() < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.usefixtures("build")
def test_silu_and_mul_matches_reference(gen, dtype):
    from kernels.activation import silu_and_mul_torch

    gate_up = (3 * torch.randn(19, 2 * 100, generator=gen))   # 100: six 16-wide vectors and a tail of 4
    gate_up[0, :8] = torch.tensor([-200.0, -90.0, -30.0, -1e-3, 0.0, 1e-3, 30.0, 90.0])   # exp's range ends
    gate_up = gate_up.to(dtype)
    got = kernels.silu_and_mul(gate_up)
    want = silu_and_mul_torch(gate_up)
    assert got.shape == (19, 100)
    assert_close(got, want)
    if dtype == torch.float32:
        assert (got - want).abs().max().item() < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.usefixtures("build")
def test_rotary_in_place_on_strided_q_and_k(gen, dtype):
    from kernels.rotary import rotary_embedding_torch

    tokens, heads, kv_heads, head_dim = 23, 6, 2, 64
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=gen).to(dtype)
    ref = qkv.clone()
    angles = torch.rand(300, head_dim // 2, generator=gen) * 6.28
    cos_sin = torch.cat([angles.cos(), angles.sin()], dim=-1)
    positions = torch.randint(0, 300, (tokens,), generator=gen)

    def views(t):
        q, k, _ = t.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
        return q.view(tokens, heads, head_dim), k.view(tokens, kv_heads, head_dim)

    assert cpu_kernels.rotary_supports(positions, *views(qkv), cos_sin)
    kernels.rotary_embedding(positions, *views(qkv), cos_sin)
    rotary_embedding_torch(positions, *views(ref), cos_sin)
    assert torch.equal(qkv[:, (heads + kv_heads) * head_dim:], ref[:, (heads + kv_heads) * head_dim:]), "v touched"
    assert_close(qkv, ref)
    with pytest.raises(IndexError, match="RoPE table"):
        cpu_kernels.rotary_embedding(positions + 300, *views(qkv), cos_sin)


needs_linear = pytest.mark.skipif(not cpu_kernels.linear_available(), reason="the linear kernel needs AVX-512 or AVX2 with FMA")


@needs_linear
def test_a_build_of_another_source_binds_what_it_has_and_runs(tmp_path, monkeypatch):
    """benchmarks/cpu_linear.py --source REV: an earlier revision's cpu_kernels.c, which may lack a
    function this one has, built beside the engine's for a column of its own."""
    _build_in(tmp_path, monkeypatch)
    older = tmp_path / "older.c"
    older.write_text(cpu_kernels.SOURCE.read_text().replace("genq_argmax_rows", "genq_argmax_rows_not_yet"))
    lib = cpu_kernels.build_variant(source=older)
    assert lib is not cpu_kernels.library() and not hasattr(lib, "genq_argmax_rows")
    x, w = torch.randn(5, 72), torch.randn(12, 72)
    got = cpu_kernels.linear_unchecked(x, w, lib=lib)
    assert torch.allclose(got, torch.nn.functional.linear(x, w), rtol=1e-5, atol=1e-5)


@needs_linear
@pytest.mark.parametrize("rows", [1, 2, 5, 6, 7, 13, 32, cpu_kernels.LINEAR_MAX_ROWS])
@pytest.mark.parametrize("out_features,in_features", [(576, 576), (33, 17), (4, 16), (3, 1), (70, 100)])
@pytest.mark.usefixtures("build")
def test_linear_matches_torch(gen, rows, out_features, in_features):
    x = torch.randn(rows, in_features, generator=gen)
    w = torch.randn(out_features, in_features, generator=gen)
    b = torch.randn(out_features, generator=gen)
    for bias in (None, b):
        got = cpu_kernels.linear(x, w, bias)
        want = torch.nn.functional.linear(x, w, bias)
        assert got.shape == want.shape
        # one K-long float32 dot product per output, summed in another order than the BLAS's
        assert (got - want).abs().max().item() <= 1e-5 * (1 + want.abs().max().item()) * math.sqrt(in_features)


@needs_linear
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_linear_on_strided_rows_and_leading_dims(gen, threads):
    wide = torch.randn(2, 5, 300, generator=gen)
    x = wide[..., 40:240]                              # rows 300 elements apart
    w = torch.randn(130, 200, generator=gen)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = cpu_kernels.linear(x, w)
    finally:
        torch.set_num_threads(before)
    assert got.shape == (2, 5, 130)
    assert_close(got, torch.nn.functional.linear(x, w))
    assert torch.equal(wide[..., 40:240], x)


@needs_linear
@pytest.mark.parametrize("rows", [1, 6, 7, 32])
def test_linear_bfloat16_sums_in_float32_and_rounds_once(gen, rows):
    x = torch.randn(rows, 577, generator=gen).bfloat16()     # a K tail of 1
    w = torch.randn(70, 577, generator=gen).bfloat16()       # 17 tiles of 4 and 2 rows on their own
    b = torch.randn(70, generator=gen).bfloat16()
    got = cpu_kernels.linear(x, w, b)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, 70)
    exact = torch.nn.functional.linear(x.double(), w.double(), b.double())
    # one rounding of a float32 sum: within one bfloat16 step (2^-8 relative) of the exact result,
    # and equal to the float32 BLAS's rounded result but where the two float32 sums straddle a rounding boundary
    assert ((got.double() - exact).abs() <= exact.abs() * 2 ** -8 + 1e-6).all()
    blas = torch.nn.functional.linear(x.float(), w.float(), b.float()).bfloat16()
    assert (got == blas).float().mean().item() > 0.98


@needs_linear
@pytest.mark.parametrize("rows", [1, 6])
def test_linear_bfloat16_rounds_ties_to_even_and_keeps_nan(rows):
    # Sums that fall exactly between two bfloat16 values, and NaN and infinities, through a 4-row
    # weight tile (its four sums rounded in one register) and through a single row on its own.
    x = torch.zeros(rows, 64, dtype=torch.bfloat16)
    x[:, 0], x[:, 1] = 1.0, 1.0
    pairs = [(1.0, 2 ** -8), (1.0, 3 * 2 ** -8), (-1.0, -(2 ** -8)), (2.0, 2 ** -7), (float("nan"), 1.0),
             (float("inf"), 1.0), (float("-inf"), 1.0), (0.5, 0.25), (1.0, 2 ** -9)]
    w = torch.zeros(len(pairs), 64, dtype=torch.bfloat16)
    w[:, 0] = torch.tensor([a for a, _ in pairs]).bfloat16()
    w[:, 1] = torch.tensor([b for _, b in pairs]).bfloat16()
    got = cpu_kernels.linear(x, w)
    want = torch.tensor([a + b for a, b in pairs], dtype=torch.float32).bfloat16().expand(rows, -1)
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    finite = ~torch.isnan(want)
    assert torch.equal(got[finite].view(torch.int16), want[finite].view(torch.int16))
    assert got[0, 0].item() == 1.0 and got[0, 1].item() == 1.015625   # ties went to the even neighbour


@needs_linear
def test_linear_dispatch(gen, monkeypatch):
    calls = []
    real = cpu_kernels.linear_unchecked   # what the dispatch calls once it has checked the tensors
    monkeypatch.setattr(cpu_kernels, "linear_unchecked", lambda *a, **k: calls.append(1) or real(*a, **k))
    w = torch.randn(64, 32, generator=gen)
    small, large = torch.randn(8, 32, generator=gen), torch.randn(cpu_kernels.LINEAR_MAX_ROWS + 1, 32, generator=gen)
    assert_close(kernels.linear(small, w), torch.nn.functional.linear(small, w))
    assert calls == [1], "a decode-sized float32 batch did not reach the kernel"
    # prefill-sized float32 batches go to oneDNN where it runs (the BLAS's result up to summation
    # order), never to the kernel; impl="torch" stays on PyTorch, bit for bit
    onednn = linear_module.onednn_available()   # (its own probe call is made before counting)
    onednn_calls = []
    real_onednn = torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise",
                        lambda *a: onednn_calls.append(1) or real_onednn(*a), raising=False)
    assert_close(kernels.linear(large, w), torch.nn.functional.linear(large, w))
    assert onednn_calls == ([1] if onednn else [])
    assert torch.equal(kernels.linear(small, w, impl="torch"), torch.nn.functional.linear(small, w))
    assert calls == [1]
    # bfloat16: decode-sized batches go to the kernel (vdpbf16ps where the CPU has AVX512-BF16, else
    # widened to float32); larger ones to PyTorch's own bfloat16 matmul where the CPU has bfloat16
    # arithmetic, else to float32 arithmetic. All agree with the exact product to bfloat16's precision.
    for x in (small, large):
        got = kernels.linear(x.bfloat16(), w.bfloat16())
        exact = torch.nn.functional.linear(x.bfloat16().double(), w.bfloat16().double())
        assert ((got.double() - exact).abs() <= exact.abs() * 2 ** -8 + 1e-6).all()
    small_bf16_to_kernel = cpu_kernels.linear_native_bfloat16() or not cpu_kernels.native_bfloat16()
    assert calls == ([1, 1] if small_bf16_to_kernel else [1])
    assert torch.equal(kernels.linear(small.half(), w.half()), torch.nn.functional.linear(small.half(), w.half()))


@pytest.mark.skipif(not cpu_kernels.linear_native_bfloat16(), reason="needs AVX512-BF16")
@pytest.mark.parametrize("rows", [1, 5, 6, 13, cpu_kernels.LINEAR_MAX_ROWS])
@pytest.mark.parametrize("in_features", [576, 577, 31, 64, 1536])
def test_linear_vdpbf16ps_matches_float32_sums(gen, rows, in_features):
    # K tails of 0, 1 and 31 elements (32 per instruction); 4-row tiles and single rows; bias or none.
    x = torch.randn(rows, in_features, generator=gen).bfloat16()
    w = torch.randn(70, in_features, generator=gen).bfloat16()
    b = torch.randn(70, generator=gen).bfloat16()
    for bias in (None, b):
        got = cpu_kernels.linear(x, w, bias)
        exact = torch.nn.functional.linear(x.double(), w.double(), None if bias is None else bias.double())
        assert ((got.double() - exact).abs() <= exact.abs() * 2 ** -8 + 1e-6).all()
        blas = torch.nn.functional.linear(x.float(), w.float(), None if bias is None else bias.float()).bfloat16()
        assert (got == blas).float().mean().item() > 0.97


@pytest.fixture
def amx_back_on():
    yield
    cpu_kernels.linear_amx(True)


@pytest.mark.skipif(not cpu_kernels.linear_amx(), reason="needs AMX-BF16 (and Linux lending the tiles)")
@pytest.mark.parametrize("rows", [1, 5, 16, 17, 32, 33, 70])
@pytest.mark.parametrize("out_features", [16, 48, 960])
def test_linear_amx_tiles_match_the_exact_sums(gen, amx_back_on, rows, out_features):
    # One or two 16-row weight blocks per pair (48 ends on a single block); one or two 16-row tiles of
    # x, and more than 32 rows in two passes; x rows strided (a slice of a wider tensor); bias or none;
    # bfloat16 and float32 output. Both paths (tiles, vdpbf16ps) are float32 sums of exact products
    # within float32's rounding of |x| |W|, then rounded once.
    wide = torch.randn(rows, 1536 + 64, generator=gen).bfloat16()
    x = wide[:, 32:32 + 1536]
    w = torch.randn(out_features, 1536, generator=gen).bfloat16()
    b = torch.randn(out_features, generator=gen).bfloat16()
    for bias in (None, b):
        exact = torch.nn.functional.linear(x.double(), w.double(), None if bias is None else bias.double())
        scale = torch.nn.functional.linear(x.double().abs(), w.double().abs(),
                                           None if bias is None else bias.double().abs())
        got = {}
        for amx in (True, False):
            assert cpu_kernels.linear_amx(amx) == amx
            got[amx] = (cpu_kernels.linear_unchecked(x, w, bias),
                        cpu_kernels.linear_unchecked(x, w, bias, float32_out=True))
        for y, y32 in got.values():
            assert ((y.double() - exact).abs() <= exact.abs() * 2 ** -8 + scale * 2 ** -20).all()
            assert ((y32.double() - exact).abs() <= scale * 2 ** -20).all()
            assert torch.equal(y32.bfloat16(), y)
        # the two differ in the order of the float32 additions only: nearly every output is the same
        assert (got[True][0] == got[False][0]).float().mean().item() > 0.97
    # a row's result does not depend on the rows beside it (the LM head's logits, whatever the batch)
    cpu_kernels.linear_amx(True)
    whole = kernels.linear_float32_out(x, w)
    for i in range(rows):
        assert torch.equal(kernels.linear_float32_out(x[i:i + 1], w), whole[i:i + 1])


@pytest.mark.skipif(not cpu_kernels.linear_amx(), reason="needs AMX-BF16 (and Linux lending the tiles)")
@pytest.mark.parametrize("rows", [1, 5, 16, 17, 33, 79, 300])
@pytest.mark.parametrize("out_features", [16, 48, 960])
def test_tile_packed_weights_give_the_same_bits(gen, rows, out_features):
    # x as the tiles' A operand in place (strided rows, tails of 1-15 rows, groups of rows past 32)
    # against the packed W: every product and float32 sum as the unpacked tiles make them, so the
    # same bits, bias or none, bfloat16 or float32 out
    x = torch.randn(rows, 1536 + 64, generator=gen).bfloat16()[:, 32:32 + 1536]
    w = torch.randn(out_features, 1536, generator=gen).bfloat16()
    b = torch.randn(out_features, generator=gen).bfloat16()
    tiles = cpu_kernels.pack_tiles(w)
    assert tiles is not None and tiles.shape == w.shape and not torch.equal(tiles, w)
    for bias in (None, b):
        for float32_out in (False, True):
            assert torch.equal(cpu_kernels.linear_unchecked(x, w, bias, float32_out, tiles=tiles),
                               cpu_kernels.linear_unchecked(x, w, bias, float32_out))
    # kernels.linear takes the tiles up to LINEAR_MAX_ROWS_TILES rows, past the plain kernel's limit
    # (where oneDNN would multiply): the kernel's bits there too
    if rows > cpu_kernels.LINEAR_MAX_ROWS_NATIVE_BF16:
        assert torch.equal(kernels.linear(x, w, b, tiles=tiles), cpu_kernels.linear_unchecked(x, w, b))


@pytest.mark.skipif(not cpu_kernels.linear_native_bfloat16(), reason="needs AVX512-BF16 or AMX-BF16")
@pytest.mark.parametrize("rows", [1, 5, 6, 7, 13, 33, 79, 300])
@pytest.mark.parametrize("out_features,in_features", [(16, 1536), (48, 1536), (80, 64), (960, 576)])
def test_tile_packed_weights_on_vdpbf16ps_match_the_exact_sums(gen, amx_back_on, rows, out_features, in_features):
    # Without the tiles (a CPU with AVX512-BF16 only, or AMX turned off) the packed copy is multiplied
    # as an outer product (linear_dpbf16_packed): register blocks of 1-6 rows of x and 1-4 groups of 16
    # outputs (16: one group; 48: three; 80: five, split between threads), x rows strided, bias or none,
    # bfloat16 or float32 out. Each output a float32 sum of exact products in k order: within float32's
    # rounding of |x| |W| of the exact sum, nearly always the unpacked kernel's bits, and a row's result
    # the same whatever rows share its call.
    cpu_kernels.linear_amx(False)
    x = torch.randn(rows, in_features + 64, generator=gen).bfloat16()[:, 32:32 + in_features]
    w = torch.randn(out_features, in_features, generator=gen).bfloat16()
    b = torch.randn(out_features, generator=gen).bfloat16()
    tiles = cpu_kernels.pack_tiles(w)
    assert tiles is not None and not torch.equal(tiles, w)
    for bias in (None, b):
        exact = torch.nn.functional.linear(x.double(), w.double(), None if bias is None else bias.double())
        scale = torch.nn.functional.linear(x.double().abs(), w.double().abs(),
                                           None if bias is None else bias.double().abs())
        y = cpu_kernels.linear_unchecked(x, w, bias, tiles=tiles)
        y32 = cpu_kernels.linear_unchecked(x, w, bias, float32_out=True, tiles=tiles)
        assert ((y.double() - exact).abs() <= exact.abs() * 2 ** -8 + scale * 2 ** -20).all()
        assert ((y32.double() - exact).abs() <= scale * 2 ** -20).all()
        assert torch.equal(y32.bfloat16(), y)
        assert (y == cpu_kernels.linear_unchecked(x, w, bias)).float().mean().item() > 0.97
        for i in sorted({0, rows // 2, rows - 1}):
            assert torch.equal(cpu_kernels.linear_unchecked(x[i:i + 1], w, bias, float32_out=True, tiles=tiles),
                               y32[i:i + 1])


def test_pack_tiles_refuses_what_the_tiles_cannot_take(gen):
    w = torch.randn(48, 64, generator=gen)
    assert cpu_kernels.pack_tiles(w) is None                            # float32
    assert cpu_kernels.pack_tiles(w[:40].bfloat16()) is None             # N not a multiple of 16
    assert cpu_kernels.pack_tiles(w[:, :48].bfloat16().contiguous()) is None   # K not a multiple of 32
    assert (cpu_kernels.pack_tiles(w.bfloat16()) is not None) == cpu_kernels.linear_native_bfloat16()


@pytest.mark.skipif(not cpu_kernels.linear_native_bfloat16(), reason="needs AVX512-BF16 or AMX-BF16")
def test_linear_refuses_tiles_of_another_weight(gen):
    w = torch.randn(48, 64, generator=gen).bfloat16()
    x = torch.randn(3, 64, generator=gen).bfloat16()
    for wrong in (cpu_kernels.pack_tiles(w[:32].contiguous()), cpu_kernels.pack_tiles(w).float()):
        with pytest.raises(ValueError, match="pack_tiles"):
            cpu_kernels.linear_unchecked(x, w, tiles=wrong)


@pytest.mark.skipif(not cpu_kernels.linear_amx(), reason="needs AMX-BF16 (and Linux lending the tiles)")
def test_linear_amx_leaves_other_shapes_to_vdpbf16ps(gen, amx_back_on):
    # K not a multiple of 32, or N not of 16: the same bits with the tiles on or off
    for n, k in ((70, 576), (64, 577), (48, 40)):
        x, w = torch.randn(9, k, generator=gen).bfloat16(), torch.randn(n, k, generator=gen).bfloat16()
        on = cpu_kernels.linear(x, w)
        assert not cpu_kernels.linear_amx(False)
        assert torch.equal(cpu_kernels.linear(x, w), on)
        cpu_kernels.linear_amx(True)
    # and where it applies it is the tiles that run: some output differs in its last bit
    x, w = torch.randn(32, 1536, generator=gen).bfloat16(), torch.randn(960, 1536, generator=gen).bfloat16()
    on = cpu_kernels.linear(x, w)
    cpu_kernels.linear_amx(False)
    assert not torch.equal(cpu_kernels.linear(x, w), on)


@pytest.mark.skipif(not cpu_kernels.linear_amx(), reason="needs AMX-BF16 (and Linux lending the tiles)")
def test_bfloat16_row_limit_does_not_move_with_the_switch(amx_back_on):
    # one limit for vdpbf16ps and the tiles, so a benchmark or test turning them off compares the same steps
    limit = cpu_kernels.linear_max_rows(torch.bfloat16)
    assert limit == cpu_kernels.LINEAR_MAX_ROWS_NATIVE_BF16
    assert not cpu_kernels.linear_amx(False)
    assert cpu_kernels.linear_max_rows(torch.bfloat16) == limit
    assert cpu_kernels.library().genq_linear_set_amx(-1) == 0


@needs_linear
def test_linear_refuses_what_it_cannot_take(gen):
    x, w = torch.randn(4, 32, generator=gen), torch.randn(16, 32, generator=gen)
    for args in [(x, w.t().contiguous().t()), (x, torch.randn(16, 31)), (x.double(), w.double()), (x, w.bfloat16()),
                 (torch.randn(cpu_kernels.LINEAR_MAX_ROWS + 1, 32), w), (x, w, torch.randn(15))]:
        with pytest.raises(ValueError, match="linear: unsupported"):
            cpu_kernels.linear(*args)



@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.usefixtures("build")
def test_store_kv_matches_reference_on_strided_rows(gen, dtype):
    from kernels.kv_cache import store_kv_torch

    tokens, kv_heads, head_dim = 9, 3, 64
    qkv = torch.randn(tokens, (9 + 2 * kv_heads) * head_dim, generator=gen).to(dtype)
    k = qkv[:, 9 * head_dim:12 * head_dim].view(tokens, kv_heads, head_dim)     # rows apart, as in the model
    v = qkv[:, 12 * head_dim:].view(tokens, kv_heads, head_dim)
    caches = [torch.randn(6, 4, kv_heads, head_dim, generator=gen).to(dtype) for _ in range(2)]
    caches += [c.clone() for c in caches]      # the same starting caches for the reference
    slots = torch.tensor([3, 0, 23, -1, 7, 8, 9, -1, 12])
    assert cpu_kernels.store_kv_supports(k, v, caches[0], caches[1], slots)
    kernels.store_kv(k, v, caches[0], caches[1], slots)
    store_kv_torch(k, v, caches[2], caches[3], slots)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
    before = [c.clone() for c in caches[:2]]
    with pytest.raises(IndexError, match="past the cache"):
        cpu_kernels.store_kv(k, v, caches[0], caches[1], torch.tensor([3, 0, 24, -1, 7, 8, 9, -1, 12]))
    assert torch.equal(caches[0], before[0]) and torch.equal(caches[1], before[1]), "nothing written"


def test_rows_whose_tables_part_in_the_last_block_are_not_one_tile(gen):
    # Two rows over 17 and 18 tokens, as a prefill chunk's rows are, whose block tables share block 0
    # but not block 1: each must read its own block 1 (a tile reads through its first row's table).
    kv_heads, heads, dim, bs = 3, 9, 64, 16
    k_cache = torch.randn(4, bs, kv_heads, dim, generator=gen)
    v_cache = torch.randn(4, bs, kv_heads, dim, generator=gen)
    tables = torch.tensor([[0, 1], [0, 2]], dtype=torch.int32)
    lens = torch.tensor([17, 18], dtype=torch.int32)
    q = torch.randn(2, heads, dim, generator=gen)
    out = torch.empty_like(q)
    cpu_kernels.paged_decode(q, k_cache, v_cache, tables, lens, torch.tensor([0, 1]), 0.125, out)
    for r in range(2):
        blocks = tables[r].long()
        k = k_cache[blocks].reshape(-1, kv_heads, dim)[: lens[r]].double()
        v = v_cache[blocks].reshape(-1, kv_heads, dim)[: lens[r]].double()
        group = heads // kv_heads
        scores = torch.einsum("hd,thd->ht", q[r].double() * 0.125, k.repeat_interleave(group, dim=1))
        want = torch.einsum("ht,thd->hd", scores.softmax(-1), v.repeat_interleave(group, dim=1))
        assert torch.allclose(out[r].double(), want, atol=1e-5), f"row {r}"


def test_short_prefill_chunks_run_in_the_kernel(gen, monkeypatch):
    """Every token of a chunk over at most PREFILL_IN_KERNEL_MAX_CONTEXT cached tokens is a row of the
    compiled kernel (one call, beside the decode rows); longer chunks go to SDPA."""
    pa = importlib.import_module("kernels.paged_attention")

    kernel_rows, sdpa_chunks = [], []
    real_decode, real_sdpa = cpu_kernels.paged_decode, pa._prefill_chunk_sdpa
    monkeypatch.setattr(cpu_kernels, "paged_decode",
                        lambda q, kc, vc, t, lens, rows, *a: kernel_rows.append(len(rows)) or real_decode(q, kc, vc, t, lens, rows, *a))
    monkeypatch.setattr(pa, "_prefill_chunk_sdpa", lambda q, *a: sdpa_chunks.append(q.shape[0]) or real_sdpa(q, *a))
    out, ref = run_both(gen, PREFILL_BOTH_WAYS, 2, num_heads=9, num_kv_heads=3, head_dim=64, block_size=16,
                        dtype=torch.float32)
    assert_close(out, ref)
    short = [n for before, n in PREFILL_BOTH_WAYS if n > 1 and before + n <= pa.PREFILL_IN_KERNEL_MAX_CONTEXT]
    decode = [n for _, n in PREFILL_BOTH_WAYS if n == 1]
    assert kernel_rows == [sum(short) + len(decode)]
    assert sorted(sdpa_chunks) == sorted(n for before, n in PREFILL_BOTH_WAYS
                                         if n > 1 and before + n > pa.PREFILL_IN_KERNEL_MAX_CONTEXT)


@pytest.mark.skipif(not cpu_kernels.linear_native_bfloat16(), reason="needs AVX512-BF16")
@pytest.mark.parametrize("rows", [1, 7, cpu_kernels.LINEAR_MAX_ROWS_NATIVE_BF16 + 9])
def test_linear_float32_out_keeps_the_unrounded_sums(gen, rows):
    # The LM head on a bfloat16 model: float32 logits at any number of rows, each the float32 sum the
    # bfloat16 output would have been rounded from; a row's logits do not depend on its batch.
    x = torch.randn(rows, 577, generator=gen).bfloat16()
    w = torch.randn(70, 577, generator=gen).bfloat16()
    got = kernels.linear_float32_out(x, w)
    assert got.dtype == torch.float32 and got.shape == (rows, 70)
    exact = torch.nn.functional.linear(x.double(), w.double())
    assert ((got.double() - exact).abs() <= 1e-5 * (1 + exact.abs())).all()
    assert torch.equal(got.bfloat16(), cpu_kernels.linear_unchecked(x, w))
    assert torch.equal(kernels.linear_float32_out(x[:1], w), got[:1])


@pytest.mark.skipif(not linear_module.onednn_available(), reason="PyTorch's oneDNN linear op does not run here")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [cpu_kernels.LINEAR_MAX_ROWS + 1, 300])
def test_prepacked_weights_give_the_same_results(gen, dtype, rows):
    """A projection's oneDNN-packed copy (prefill batches) changes the speed, not one bit of y."""
    w = torch.randn(200, 96, generator=gen).to(dtype)
    b = torch.randn(200, generator=gen).to(dtype)
    x = torch.randn(rows, 96, generator=gen).to(dtype)
    packed = linear_module.prepack(w)
    assert packed is not None
    # bfloat16 without bfloat16 arithmetic is multiplied in float32: its packed copy is widened
    widened = dtype == torch.bfloat16 and not cpu_kernels.native_bfloat16()
    assert packed.dtype == (torch.float32 if widened else dtype)
    for bias in (None, b):
        plain = kernels.linear(x, w, bias)
        assert torch.equal(kernels.linear(x, w, bias, packed=packed), plain)
        exact = torch.nn.functional.linear(x.double(), w.double(), None if bias is None else bias.double())
        assert ((plain.double() - exact).abs() <= 2e-2 * (1 + exact.abs())).all()


def test_an_engine_on_the_cpu_packs_its_projections(tmp_path):
    from worker.engine import LLMEngine
    from worker.engine.models.llama import Linear
    from worker.engine.tiny import build_tiny_model

    engine = LLMEngine(str(build_tiny_model(tmp_path / "m", tie_word_embeddings=False)), num_kv_blocks=16)
    lm_head = engine.model.lm_head
    linears = [m for m in engine.model.modules() if type(m) is Linear and m is not lm_head]
    assert linears and lm_head is not None
    assert all((m.packed_weight is not None) == linear_module.onednn_available() for m in linears)
    assert lm_head.packed_weight is None     # compute_logits multiplies its plain weight
    assert all(m.tiles is None for m in linears)   # float32: no tile copies
    assert "tiles" not in "".join(engine.model.state_dict())   # the copies are not part of the model's state


@pytest.mark.skipif(not cpu_kernels.linear_native_bfloat16(), reason="needs AVX512-BF16 or AMX-BF16")
def test_a_bfloat16_engine_multiplies_on_tile_packed_copies_with_the_same_results(tmp_path, monkeypatch):
    # Every projection of a bfloat16 model gets its pack_tiles copy, and the engine's tokens and
    # logprobs are those of the same engine without them (one-call and per-op steps alike): bit for
    # bit on AMX tiles; through vdpbf16ps the sums' order differs, so the same tokens and logprobs
    # within bfloat16's rounding
    from worker.engine import LLM, SamplingParams
    from worker.engine.models import llama
    from worker.engine.tiny import build_tiny_model

    model = str(build_tiny_model(tmp_path / "m"))
    prompts = [[1 + (7 * i + j) % 90 for j in range(20 + 30 * i)] for i in range(6)]
    params = SamplingParams(temperature=0, max_tokens=10, logprobs=2, ignore_eos=True)

    def run():
        llm = LLM(model=model, dtype="bfloat16", max_num_batched_tokens=256)
        linears = [m for m in llm.engine.model.modules() if type(m) is llama.Linear]
        outs = llm.generate(prompts, params, use_tqdm=False)
        return [m.tiles is not None for m in linears], [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outs]

    tiled, with_tiles = run()
    assert tiled and all(tiled)
    monkeypatch.setattr(cpu_kernels, "pack_tiles", lambda weight: None)
    untiled, without = run()
    assert not any(untiled)
    if cpu_kernels.linear_amx():
        assert with_tiles == without
        return
    assert [tokens for tokens, _ in with_tiles] == [tokens for tokens, _ in without]
    for (_, a), (_, b) in zip(with_tiles, without):
        for step_a, step_b in zip(a, b, strict=True):
            assert step_a.keys() == step_b.keys()
            assert all(abs(step_a[t] - step_b[t]) < 0.05 for t in step_a)

"""Compiled CPU kernels (C, built at first use with the system's C compiler, called with ctypes).

`linear(...)` is a matmul for decode batch sizes (a few to a few dozen rows), where the BLAS
PyTorch calls is 2-4x slower per row than at prefill sizes. `paged_decode(...)` runs the decode
rows of paged attention straight from the block-table cache: the PyTorch path must gather every
sequence's blocks into a padded copy first, which is most of a CPU decode step's attention time.
`rms_norm`, `silu_and_mul`, `rotary_embedding` and `store_kv` do in one pass what takes PyTorch
several (and a dispatch each). Only a C compiler is needed (no PyTorch headers): the build takes
well under a second and is cached under the directory the engine sets with `set_cache_dir` (its
cache_dir + `/kernels`; default `~/.cache/genq/kernels`), keyed by the source, the compiler and
this CPU's flags (the library is built with `-march=native`). Without a compiler the engine warns
once and stays on PyTorch.
"""
from __future__ import annotations

import ctypes
import fcntl
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu") / "cpu_kernels.c"
CFLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fPIC", "-shared", "-Wall"]
# With OpenMP the kernel shares PyTorch's thread pool (PyTorch's libgomp is loaded first, and ours
# resolves to it by soname); a compiler without OpenMP builds it single-threaded instead.
OPENMP_FLAGS = (["-fopenmp"], ["-fopenmp-simd"])
DTYPES = {torch.float32: 0, torch.bfloat16: 1}
_MAX_HEADS = 4096


class KernelBuildError(RuntimeError):
    """The C kernels could not be compiled or loaded here."""


_build_dir: Path | None = None   # None: ~/.cache/genq/kernels


def set_cache_dir(path: str | os.PathLike | None) -> None:
    """Where builds are cached from now on (None: the default). The engine sets it from its config
    before the first kernel call; a library already loaded stays in use."""
    global _build_dir
    _build_dir = None if path is None else Path(path).expanduser()


def _cache_dir() -> Path:
    return _build_dir or Path.home() / ".cache" / "genq" / "kernels"


def _compiler() -> str | None:
    cc = os.environ.get("CC")   # noqa: TID251 -- the conventional compiler override, not a genq setting
    return cc or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return ""


def _build(compiler: str, extra_flags: tuple[str, ...] = (), source: Path | None = None) -> Path:
    source = source or SOURCE
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256("\0".join([source.read_text(), compiler, version, _cpu_flags(), *CFLAGS, *extra_flags,
                                    *OPENMP_FLAGS[0]]).encode())
    target = _cache_dir() / f"cpu_kernels-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)        # one build at a time; the others then find it built
        if target.exists():
            return target
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            built = Path(tmp) / target.name
            for threading_flags in OPENMP_FLAGS:
                result = subprocess.run([compiler, *CFLAGS, *extra_flags, *threading_flags, "-o", str(built), str(source),
                                         "-lm"],
                                        capture_output=True, text=True)
                if result.returncode == 0:
                    break
            else:
                raise KernelBuildError(f"{compiler} failed on {source.name}:\n{result.stderr[-2000:]}")
            os.replace(built, target)
    return target


def library() -> ctypes.CDLL:
    """The compiled kernels; KernelBuildError if they cannot be built or loaded here."""
    return build_variant()


@functools.cache
def build_variant(*extra_flags: str, source: Path | None = None) -> ctypes.CDLL:
    """The kernels built with `extra_flags` after CFLAGS (none: the engine's build). The tests build
    the AVX2 paths on an AVX-512 CPU with `-mno-avx512f`, so that both are checked wherever they run.
    `source`: another version of cpu_kernels.c (benchmarks compare an earlier revision's build with
    this one in one process); its functions that this version added are left unbound."""
    compiler = _compiler()
    if compiler is None:
        raise KernelBuildError("no C compiler (cc, gcc or clang) on PATH")
    try:
        lib = ctypes.CDLL(str(_build(compiler, extra_flags, source)))
    except OSError as exc:
        raise KernelBuildError(f"cannot load the compiled kernels: {exc}") from exc
    p, i, i64, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float
    signatures = {
        "genq_paged_decode": [p, i64, p, p, p, i, p, i64, p, p, i, i, i, i, i, f, i],
        "genq_rms_norm": [p, p, p, p, p, i64, i, f, i, i],
        "genq_silu_mul": [p, p, i64, i, i, i],
        "genq_rotary": [p, p, i64, i, p, i64, i, p, i64, i, i64, i, i],
        "genq_linear": [p, i64, p, p, p, i64, i, i, i, i, i],
        "genq_linear_packed": [p, i64, p, p, p, p, i64, i, i, i, i, i],
        "genq_store_kv": [p, i64, p, i64, p, p, p, i64, i64, i, i],
        "genq_argmax_rows": [p, i64, i64, i64, p, i],
        "genq_linear_supported": [],
        "genq_linear_native_bf16": [],
        "genq_linear_set_amx": [i],
        "genq_decode_layers": [p, i, p, p, p, p, p, p, p, i64, i, i, i, i, i, f, p, p, i64, p, i64, p, i64, p, p, i,
                               i, f, i, i, i, i, i, i],
    }
    for name, argtypes in signatures.items():
        if source is not None and not hasattr(lib, name):
            continue
        fn = getattr(lib, name)
        fn.restype = ctypes.c_int
        fn.argtypes = argtypes
    return lib


@functools.cache
def available() -> bool:
    """True when the kernels build and load; otherwise warns once and says False."""
    try:
        library()
    except KernelBuildError as exc:
        log.warning("compiled CPU kernels unavailable, using PyTorch: %s", exc)
        return False
    return True


def supports(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether `paged_decode` takes these tensors (CPU, float32 or bfloat16, one dtype, a contiguous
    cache; `paged_decode` itself also needs each token's row of q contiguous: `q_rows_ok`)."""
    return (q.device.type == "cpu" and k_cache.device.type == "cpu" and q.dtype in DTYPES
            and k_cache.dtype == q.dtype and k_cache.is_contiguous()
            and q.shape[1] % k_cache.shape[2] == 0 and q.shape[1] <= _MAX_HEADS)


def q_rows_ok(q: torch.Tensor) -> bool:
    """Heads contiguous within each token's row (the rows themselves may be apart: a slice of qkv)."""
    return q.stride(2) == 1 and q.stride(1) == q.shape[2]


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 seq_lens: torch.Tensor, rows: torch.Tensor, scale: float, out: torch.Tensor) -> None:
    """For each sequence s with rows[s] >= 0, writes out[rows[s]] = attention of q[rows[s]] over the
    sequence's first seq_lens[s] cached tokens. q, out: [num_tokens, num_heads, head_dim];
    caches: [num_blocks, block_size, num_kv_heads, head_dim]; block_tables [num_seqs, n] int32;
    seq_lens [num_seqs] int32; rows [num_seqs] int64."""
    if not (supports(q, k_cache) and q_rows_ok(q) and v_cache.dtype == q.dtype and v_cache.is_contiguous()
            and out.dtype == q.dtype and out.is_contiguous() and out.shape == q.shape):
        raise ValueError("paged_decode: unsupported tensors (see kernels.cpu_kernels.supports)")
    tables = block_tables.to(torch.int32).contiguous()
    lens = seq_lens.to(torch.int32).contiguous()
    rows = rows.to(torch.int64).contiguous()
    num_heads, head_dim = q.shape[1], q.shape[2]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    status = library().genq_paged_decode(
        q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(), out.data_ptr(), DTYPES[q.dtype],
        tables.data_ptr(), tables.stride(0), lens.data_ptr(), rows.data_ptr(), lens.shape[0],
        num_heads, num_kv_heads, head_dim, block_size, float(scale), _threads())
    if status != 0:
        raise RuntimeError(f"paged_decode failed (status {status})")


def _threads(elements: int | None = None) -> int:
    """PyTorch's thread count; 1 for an elementwise op over fewer than SMALL_OP_ELEMENTS (a decode
    step's: waking the pool costs more than the work)."""
    if elements is not None and elements < SMALL_OP_ELEMENTS:
        return 1
    return torch.get_num_threads()


SMALL_OP_ELEMENTS = 1 << 16


def _elementwise_ok(*tensors: torch.Tensor) -> bool:
    first = tensors[0]
    return all(t.device.type == "cpu" and t.dtype == first.dtype for t in tensors) and first.dtype in DTYPES


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """kernels.rms_norm's contract, in one pass: the normed rows, or (normed, x + residual)."""
    x = x.contiguous()
    hidden = x.shape[-1]
    out = torch.empty_like(x)
    new_residual = None
    if residual is not None:
        residual = residual.contiguous()
        new_residual = torch.empty_like(x)
    weight = weight.contiguous()
    status = library().genq_rms_norm(
        x.data_ptr(), None if residual is None else residual.data_ptr(), weight.data_ptr(), out.data_ptr(),
        None if new_residual is None else new_residual.data_ptr(), x.numel() // hidden, hidden, float(eps),
        DTYPES[x.dtype], _threads(x.numel()))
    if status != 0:
        raise RuntimeError(f"rms_norm failed (status {status})")
    return out if residual is None else (out, new_residual)


def rms_norm_supports(x, weight, residual) -> bool:
    return _elementwise_ok(x, weight, *([] if residual is None else [residual])) and weight.shape[-1] == x.shape[-1]


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up = [..., 2 * inter] (gate first), in one pass."""
    gate_up = gate_up.contiguous()
    inter = gate_up.shape[-1] // 2
    out = gate_up.new_empty(*gate_up.shape[:-1], inter)
    library().genq_silu_mul(gate_up.data_ptr(), out.data_ptr(), gate_up.numel() // (2 * inter), inter,
                            DTYPES[gate_up.dtype], _threads(gate_up.numel()))
    return out


def argmax_rows_supports(x: torch.Tensor) -> bool:
    """A 2-D float32 CPU tensor with contiguous rows and at least one column (the LM head's logits)."""
    return x.dim() == 2 and x.dtype == torch.float32 and x.device.type == "cpu" and x.stride(-1) == 1 \
        and x.shape[1] > 0


def argmax_rows(x: torch.Tensor) -> list[int]:
    """Each row's first maximum (a NaN counting as the maximum, its first), as max(dim=-1).indices
    gives it, of a tensor `argmax_rows_supports` takes."""
    if not argmax_rows_supports(x):
        raise ValueError(f"argmax_rows takes a 2-D float32 CPU tensor with contiguous rows, got {x.dtype} "
                         f"{tuple(x.shape)} on {x.device}")
    out = torch.empty(x.shape[0], dtype=torch.int64)
    library().genq_argmax_rows(x.data_ptr(), x.shape[0], x.shape[1], x.stride(0), out.data_ptr(), _threads(x.numel()))
    return out.tolist()


def store_kv_supports(k, v, k_cache, v_cache, slot_mapping) -> bool:
    """Rows of k and v each contiguous (the rows themselves may be apart), caches contiguous, one
    dtype everywhere, int64 slots. (Called for every layer of every step: kept cheap.)"""
    dtype = k.dtype
    if dtype not in DTYPES or v.dtype != dtype or k_cache.dtype != dtype or v_cache.dtype != dtype:
        return False
    if k.device.type != "cpu" or k_cache.device.type != "cpu" or slot_mapping.dtype != torch.int64:
        return False
    ks, vs = k.stride(), v.stride()
    shape = k.shape
    return (len(shape) == 3 and v.shape == shape and ks[2] == 1 and vs[2] == 1 and ks[1] == shape[2]
            and vs[1] == shape[2] and k_cache.shape == v_cache.shape and k_cache.shape[-2:] == shape[1:]
            and slot_mapping.shape[0] == shape[0] and k_cache.is_contiguous() and v_cache.is_contiguous()
            and v.device.type == "cpu" and v_cache.device.type == "cpu" and slot_mapping.device.type == "cpu")


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """kernels.store_kv's contract: k_cache[slot] = k[token] (flattened over blocks), slot -1 skipped."""
    slots = slot_mapping.contiguous()
    row = k.shape[1] * k.shape[2]
    status = library().genq_store_kv(k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0), k_cache.data_ptr(),
                                     v_cache.data_ptr(), slots.data_ptr(), k.shape[0], k_cache.numel() // max(row, 1),
                                     row, DTYPES[k.dtype])
    if status == 3:
        raise IndexError(f"slot {int(slots.max())} is past the cache ({k_cache.numel() // row} slots)")


def rotary_supports(positions, q, k, cos_sin_cache) -> bool:
    return (_elementwise_ok(q, k) and cos_sin_cache.dtype == torch.float32 and cos_sin_cache.is_contiguous()
            and cos_sin_cache.device.type == "cpu" and q.dim() == 3 and k.dim() == 3
            and q.stride(2) == 1 and q.stride(1) == q.shape[2] and k.stride(2) == 1 and k.stride(1) == k.shape[2]
            and q.shape[0] == k.shape[0] == positions.shape[0] and q.shape[2] == cos_sin_cache.shape[1])


def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor) -> None:
    """kernels.rotary_embedding's contract (in place on q and k, whose token rows may be strided)."""
    positions = positions.to(torch.int64).contiguous()
    status = library().genq_rotary(positions.data_ptr(), q.data_ptr(), q.stride(0), q.shape[1], k.data_ptr(),
                                   k.stride(0), k.shape[1], cos_sin_cache.data_ptr(), cos_sin_cache.shape[0],
                                   q.shape[2], q.shape[0], DTYPES[q.dtype], _threads(q.numel() + k.numel()))
    if status == 3:
        raise IndexError(f"position {int(positions.max())} is past the RoPE table ({cos_sin_cache.shape[0]})")


# Up to this many rows of x, `linear` takes the kernel, and a step of at most this many tokens runs
# every layer in one call (`DecodeLayers`), which saves the per-op path's 30-60 ms of op calls. The
# kernel beats the BLAS: on a 2-core AVX-512 Xeon 1.8-2.4x faster from 4 to 48 rows, level with
# oneDNN's packed weights at about 56 (benchmarks/cpu_linear.py), and the one call's saving outweighs
# what it loses to oneDNN up to 128 rows (level at 128): a 79-token float32 prompt took 92-98 ms
# against 131-137 ms on a 2-core AMX Xeon (docs/kernels.md). With AVX2 only (8-lane vectors, a 3-row
# register block) the kernel is ahead of oneDNN's packed weights up to 64 rows, level at 96 and 8%
# behind at 128 on a 2-core Zen 3 EPYC, and in the engine there (alternating processes) the limit at
# 128 against 32 took 48 decode rows from 10.4-11.9 to 9.1-9.4 s, 96 rows from 14.3-15.2 to
# 12.9-13.5 s, a 60-token prompt from 142-180 to 114-115 ms and a 100-token one from 233-243 to
# 182-184 ms. (Until 2026-12-01 the AVX2 block waited on its loads and lost to oneDNN from ~28 rows:
# the limit was 32.) The fair scheduler's step cost, measured by size, takes the step in its curve.
# bfloat16 widened as read keeps 48 with AVX-512 (one call is slower from 79 rows) and 32 with AVX2
# (not re-measured since).
_AVX512 = {"avx512f", "avx512dq", "avx512bw"} <= set(_cpu_flags().split())
LINEAR_MAX_ROWS = 128   # the C path's test
LINEAR_MAX_ROWS_WIDENED_BF16 = 48 if _AVX512 else 32
# bfloat16 where the kernel multiplies it natively, as float32 with AVX-512: the one call's saving
# outweighs the kernel's matmul against oneDNN's up to 128 rows. Through vdpbf16ps (AVX512-BF16) the
# kernel is faster than oneDNN's packed bfloat16 GEMM (the same instruction) up to 64 rows and level
# at 96-128 on a 2-core Zen 4 (benchmarks/cpu_linear.py --dtype bfloat16), and there a 79-token prompt
# took 54-56 against 66-70 ms with the limit at 128 against 32, decode of 64 requests 830-879 against
# 693-753 tok/s. On AMX tiles (`linear_amx`) it takes 0.7x oneDNN's time (tiles too) up to 32 rows;
# on a 2-core AMX Xeon a 79-token prompt took 43 against 61 ms, decode of 64 requests 889 against 647.
LINEAR_MAX_ROWS_NATIVE_BF16 = 128
# With a weight's tile-packed copy (`pack_tiles`) the AMX kernel reads x in place and W in one stream: on
# a 2-core AMX Xeon SmolLM2's 120 bfloat16 matmuls took 0.72-0.91x the unpacked tiles' time at 1-128
# rows (64 rows 13.9 against 18.7 ms, 128 19.7 against 27.5), 0.75-0.9x oneDNN's (packed weights, tiles
# too) from 24 to 128 rows, level with it from 256 to 1,024 and behind from 1,536 (1.3-1.4x at 2,048;
# benchmarks/cpu_linear.py --dtype bfloat16, docs/kernels.md): up to this many rows they take it. The
# same copies through vdpbf16ps (AVX512-BF16 without AMX) on a 2-core Zen 4: 0.83-0.91x W as it lies at
# 24-128 rows, 0.93-0.95x oneDNN's packed GEMM from 128 to 1,024 rows (level at 512, 0.97x at 2,048).
LINEAR_MAX_ROWS_TILES = 1024
# ... and a step of up to this many tokens runs every layer in one call (DecodeLayers) when every
# projection has its copy: on the AMX Xeon, guidellm's 16 bfloat16 streams through `genq up` (64
# requests) gave 333 against 323 output tok/s at a 188 against 198 ms median first token with the
# prompt cap at 128 (steps of 16 decode rows and 128 prompt tokens in one call instead of op by op),
# and 355 tok/s at 230 ms with the cap at 256 too (op by op there: 314 tok/s at 261 ms); 384 was no
# better than 256 (352 tok/s at 282 ms). (One run each, docs/kernels.md.)
ONE_CALL_MAX_TOKENS_TILES = 256


def linear_max_rows(dtype: torch.dtype) -> int:
    """Up to how many rows of x of this dtype `kernels.linear` (and the one-call path) takes the kernel:
    float32 LINEAR_MAX_ROWS; bfloat16 LINEAR_MAX_ROWS_NATIVE_BF16 where it is multiplied natively, else
    LINEAR_MAX_ROWS_WIDENED_BF16; 0 for any other dtype."""
    if dtype == torch.float32:
        return LINEAR_MAX_ROWS
    if dtype == torch.bfloat16:
        return LINEAR_MAX_ROWS_NATIVE_BF16 if linear_native_bfloat16() else LINEAR_MAX_ROWS_WIDENED_BF16
    return 0


@functools.cache
def linear_available() -> bool:
    """Whether this build has the linear kernel (it needs AVX-512, or AVX2 with FMA) and it loads."""
    return available() and bool(library().genq_linear_supported())


@functools.cache
def linear_native_bfloat16() -> bool:
    """Whether the linear kernel multiplies bfloat16 with vdpbf16ps here (AVX512-BF16), rather than
    widening the weights to float32."""
    return linear_available() and bool(library().genq_linear_native_bf16())


def linear_amx(enable: bool | None = None) -> bool:
    """Whether the linear kernel's bfloat16 matmuls run on AMX tiles here (shapes with K a multiple of
    32 and N of 16; the rest take vdpbf16ps): the CPU has AMX-BF16, the build has it, and Linux lent
    the tile registers. enable=False/True turns the AMX path off or back on for this process (tests
    and benchmarks compare the two), and with it the tile unit's prefill attention scores
    (`tile_scores_amx`); the answer is then whether it is on."""
    if not linear_native_bfloat16():
        return False
    return bool(library().genq_linear_set_amx(-1 if enable is None else int(enable)))


def pack_tiles(weight: torch.Tensor) -> torch.Tensor | None:
    """A copy of a bfloat16 weight [N, K] laid out in tiles (per 16 weight rows, K / 32 tiles of 16 k pairs
    by 16 rows, each 1 KB, in k order): the AMX tiles' operand with x as their other one
    (`linear_amx_packed` in cpu_kernels.c), and where the CPU has AVX512-BF16 without the tiles, 16
    outputs' k pairs a vector for vdpbf16ps as an outer product (`linear_dpbf16_packed`).
    `linear_unchecked(..., tiles=)` and DecodeLayers then multiply any number of rows of x without
    repacking them, W streaming sequentially; on AMX the same sums bit for bit as W as it lies, on
    vdpbf16ps each output's sum in k order (within float32's rounding of the other path). None where
    neither runs here or the shape is not theirs (K a multiple of 32, N of 16)."""
    n, k = weight.shape if weight.dim() == 2 else (0, 0)
    if (weight.dim() != 2 or weight.dtype != torch.bfloat16 or weight.device.type != "cpu" or n % 16 or k % 32
            or not n or not linear_native_bfloat16()):
        return None
    return weight.detach().reshape(n // 16, 16, k // 32, 16, 2).permute(0, 2, 3, 1, 4).contiguous().view(n, k)


@functools.cache
def native_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX); without it PyTorch's
    bfloat16 matmuls are emulated, several times slower than float32."""
    flags = _cpu_flags().split()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def linear_supports(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    max_rows: int = LINEAR_MAX_ROWS) -> bool:
    """float32 or bfloat16 (one dtype) on the CPU, at most `max_rows` rows, a contiguous weight; x's
    last dimension contiguous (its rows may be apart)."""
    return (x.dtype in DTYPES and weight.dtype == x.dtype and x.device.type == "cpu"
            and weight.device.type == "cpu" and x.dim() >= 1 and weight.dim() == 2
            and x.shape[-1] == weight.shape[1] and weight.is_contiguous()
            and x.numel() // max(x.shape[-1], 1) <= max_rows
            and (bias is None or (bias.dtype == x.dtype and bias.is_contiguous() and bias.shape == weight.shape[:1])))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """torch.nn.functional.linear's contract (y = x W^T + b) for the tensors `linear_supports` takes;
    products are summed in float32 (bfloat16: rounded once at the end)."""
    if not linear_supports(x, weight, bias):
        raise ValueError("linear: unsupported tensors (see kernels.cpu_kernels.linear_supports)")
    return linear_unchecked(x, weight, bias)


def linear_unchecked(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                     float32_out: bool = False, lib: ctypes.CDLL | None = None,
                     tiles: torch.Tensor | None = None) -> torch.Tensor:
    """`linear` for a caller that has checked `linear_supports` itself (kernels.linear, every
    projection of every step) or wants no row limit (benchmarks/cpu_linear.py, the LM head).
    float32_out: bfloat16 tensors in, the float32 sums out unrounded (needs `linear_native_bfloat16`).
    lib: another build of the kernels (`build_variant`; benchmarks), default the engine's.
    tiles: the weight's `pack_tiles` copy, which the packed paths then read (AMX tiles: the same bits,
    faster; vdpbf16ps: each output's sum in k order, within float32's rounding of W as it lies)."""
    n, k = weight.shape
    if tiles is not None and (tiles.shape != weight.shape or tiles.dtype != weight.dtype or not tiles.is_contiguous()):
        raise ValueError(f"linear: tiles {tuple(tiles.shape)} {tiles.dtype} are not a pack_tiles copy of this weight")
    rows = x.reshape(-1, k)
    if k and rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = x.new_empty(*x.shape[:-1], n, dtype=torch.float32 if float32_out else x.dtype)
    dtype_code = 2 if float32_out else DTYPES[x.dtype]
    if rows.shape[0] and n:
        status = (lib or library()).genq_linear_packed(
            rows.data_ptr(), rows.stride(0), weight.data_ptr(), None if tiles is None else tiles.data_ptr(),
            None if bias is None else bias.data_ptr(), out.data_ptr(), n, rows.shape[0], n, k, dtype_code, _threads())
        if status != 0:
            raise RuntimeError(f"linear failed (status {status})")
    return out


class _Layer(ctypes.Structure):
    _fields_ = [(name, ctypes.c_void_p) for name in (
        "input_norm", "post_norm", "qkv_w", "qkv_b", "o_w", "gate_up_w", "gate_up_b", "down_w", "down_b",
        "k_cache", "v_cache", "qkv_wp", "o_wp", "gate_up_wp", "down_wp")]


_TILED = ("qkv_w", "o_w", "gate_up_w", "down_w")   # a layer's projections; name + "p": its pack_tiles copy


class DecodeLayers:
    """A Llama model's decoder layers for `genq_decode_layers`: every layer of a step of few tokens in
    one call, through the same kernels as the per-op path (bit for bit its results). Built once per
    model and KV cache: it holds the tensors whose addresses it passes. A layer's "qkv_wp", "o_wp",
    "gate_up_wp" and "down_wp", where given, are its weights' `pack_tiles` copies."""

    def __init__(self, layers: list[dict[str, torch.Tensor | None]], *, num_heads: int, num_kv_heads: int,
                 head_dim: int, eps: float, cos_sin: torch.Tensor):
        first = layers[0]
        self.dtype = first["qkv_w"].dtype
        self.hidden = first["qkv_w"].shape[1]
        self.inter = first["down_w"].shape[1]
        self.num_heads, self.num_kv_heads, self.head_dim, self.eps = num_heads, num_kv_heads, head_dim, eps
        self.cos_sin = cos_sin
        self._tensors = layers            # keeps every passed tensor alive
        self._array = (_Layer * len(layers))(*[
            _Layer(*[None if layer.get(name) is None else layer[name].data_ptr() for name, _ in _Layer._fields_])
            for layer in layers])
        self.k_cache = first["k_cache"]
        self.max_tokens, self.linear_dtype = linear_max_rows(self.dtype), DTYPES[self.dtype]
        if all(layer.get(name + "p") is not None for layer in layers for name in _TILED):
            self.max_tokens = max(self.max_tokens, ONE_CALL_MAX_TOKENS_TILES)

    @staticmethod
    def usable(layers: list[dict[str, torch.Tensor | None]], cos_sin: torch.Tensor) -> bool:
        """CPU float32 or bfloat16 tensors the kernels take (contiguous, one dtype), and the linear
        kernel built here (bfloat16 on a CPU without vdpbf16ps widens, as the per-op path does)."""
        if not (layers and available() and linear_available()):
            return False
        dtype = layers[0]["qkv_w"].dtype
        if dtype not in DTYPES or cos_sin.dtype != torch.float32 or not cos_sin.is_contiguous():
            return False
        if dtype == torch.bfloat16 and native_bfloat16() and not linear_native_bfloat16():
            return False   # a bfloat16 CPU whose compiler lacks vdpbf16ps: kernels.linear takes oneDNN there
        return all(t is None or (t.device.type == "cpu" and t.dtype == dtype and t.is_contiguous())
                   for layer in layers for t in layer.values()) and all(
            layer.get(name + "p") is None or layer[name + "p"].shape == layer[name].shape
            for layer in layers for name in _TILED)

    def run(self, x: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, rows, scale: float):
        """x: [tokens, hidden] embeddings (overwritten). Returns (x, residual) after the last layer.
        rows: kernels.paged_attention.KernelRows covering every token."""
        tokens, hidden = x.shape
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        new = functools.partial(torch.empty, dtype=x.dtype)
        x = x.contiguous()
        residual, h = new(tokens, hidden), new(tokens, hidden)
        qkv, attn = new(tokens, q_size + 2 * kv_size), new(tokens, q_size)
        gate_up, act = new(tokens, 2 * self.inter), new(tokens, self.inter)
        if x.dtype != self.dtype:
            raise ValueError(f"decode_layers: {x.dtype} activations for {self.dtype} weights")
        positions = positions.to(torch.int64).contiguous()
        slots = slots.to(torch.int64).contiguous()
        row = self.k_cache.shape[2] * self.k_cache.shape[3]
        status = library().genq_decode_layers(
            self._array, len(self._tensors), x.data_ptr(), residual.data_ptr(), h.data_ptr(), qkv.data_ptr(),
            attn.data_ptr(), gate_up.data_ptr(), act.data_ptr(), tokens, hidden, self.num_heads, self.num_kv_heads,
            self.head_dim, self.inter, float(self.eps), positions.data_ptr(), self.cos_sin.data_ptr(),
            self.cos_sin.shape[0], slots.data_ptr(), self.k_cache.numel() // max(row, 1),
            rows.tables.data_ptr(), rows.tables.stride(0), rows.lens.data_ptr(), rows.rows.data_ptr(), rows.count,
            self.k_cache.shape[1], float(scale), DTYPES[x.dtype], self.linear_dtype, _threads(),
            _threads(tokens * hidden), _threads(tokens * (q_size + kv_size)), _threads(tokens * 2 * self.inter))
        if status == 33:
            raise IndexError(f"position {int(positions.max())} is past the RoPE table ({self.cos_sin.shape[0]})")
        if status == 43:
            raise IndexError(f"slot {int(slots.max())} is past the cache")
        if status != 0:
            raise RuntimeError(f"decode_layers failed (status {status})")
        return x, residual

"""Compiled CPU kernels (C, built at first use with the system's C compiler, called with ctypes).

`paged_decode(...)` runs the decode rows of paged attention straight from the block-table cache:
the PyTorch path must gather every sequence's blocks into a padded copy first, which is most of a
CPU decode step's attention time. Only a C compiler is needed (no PyTorch headers): the build
takes well under a second and is cached under `$GENQ_CACHE_DIR/kernels` (default
`~/.cache/genq/kernels`), keyed by the source, the compiler and this CPU's flags (the library is
built with `-march=native`). Without a compiler the engine warns once and stays on PyTorch.
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

SOURCE = Path(__file__).with_name("cpu") / "paged_decode.c"
CFLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fPIC", "-shared", "-Wall"]
# With OpenMP the kernel shares PyTorch's thread pool (PyTorch's libgomp is loaded first, and ours
# resolves to it by soname); a compiler without OpenMP builds it single-threaded instead.
OPENMP_FLAGS = (["-fopenmp"], ["-fopenmp-simd"])
DTYPES = {torch.float32: 0, torch.bfloat16: 1}
_MAX_HEADS = 4096


class KernelBuildError(RuntimeError):
    """The C kernels could not be compiled or loaded here."""


def _cache_dir() -> Path:
    return Path(os.environ.get("GENQ_CACHE_DIR") or Path.home() / ".cache" / "genq") / "kernels"


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return ""


def _build(compiler: str) -> Path:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), compiler, version, _cpu_flags(), *CFLAGS,
                                    *OPENMP_FLAGS[0]]).encode())
    target = _cache_dir() / f"paged_decode-{key.hexdigest()[:16]}.so"
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
                result = subprocess.run([compiler, *CFLAGS, *threading_flags, "-o", str(built), str(SOURCE), "-lm"],
                                        capture_output=True, text=True)
                if result.returncode == 0:
                    break
            else:
                raise KernelBuildError(f"{compiler} failed on {SOURCE.name}:\n{result.stderr[-2000:]}")
            os.replace(built, target)
    return target


@functools.cache
def library() -> ctypes.CDLL:
    """The compiled kernels; KernelBuildError if they cannot be built or loaded here."""
    compiler = _compiler()
    if compiler is None:
        raise KernelBuildError("no C compiler (cc, gcc or clang) on PATH")
    try:
        lib = ctypes.CDLL(str(_build(compiler)))
    except OSError as exc:
        raise KernelBuildError(f"cannot load the compiled kernels: {exc}") from exc
    fn = lib.genq_paged_decode
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                                           ctypes.c_void_p] + [ctypes.c_int] * 5 + [ctypes.c_float, ctypes.c_int]
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
    cache; `paged_decode` itself also needs q contiguous)."""
    return (q.device.type == "cpu" and k_cache.device.type == "cpu" and q.dtype in DTYPES
            and k_cache.dtype == q.dtype and k_cache.is_contiguous()
            and q.shape[1] % k_cache.shape[2] == 0 and q.shape[1] <= _MAX_HEADS)


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 seq_lens: torch.Tensor, rows: torch.Tensor, scale: float, out: torch.Tensor) -> None:
    """For each sequence s with rows[s] >= 0, writes out[rows[s]] = attention of q[rows[s]] over the
    sequence's first seq_lens[s] cached tokens. q, out: [num_tokens, num_heads, head_dim];
    caches: [num_blocks, block_size, num_kv_heads, head_dim]; block_tables [num_seqs, n] int32;
    seq_lens [num_seqs] int32; rows [num_seqs] int64."""
    if not (supports(q, k_cache) and v_cache.dtype == q.dtype and v_cache.is_contiguous()
            and out.dtype == q.dtype and out.is_contiguous() and out.shape == q.shape):
        raise ValueError("paged_decode: unsupported tensors (see kernels.cpu_kernels.supports)")
    tables = block_tables.to(torch.int32).contiguous()
    lens = seq_lens.to(torch.int32).contiguous()
    rows = rows.to(torch.int64).contiguous()
    num_heads, head_dim = q.shape[1], q.shape[2]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    status = library().genq_paged_decode(
        q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), out.data_ptr(), DTYPES[q.dtype],
        tables.data_ptr(), tables.stride(0), lens.data_ptr(), rows.data_ptr(), lens.shape[0],
        num_heads, num_kv_heads, head_dim, block_size, float(scale), torch.get_num_threads())
    if status != 0:
        raise RuntimeError(f"paged_decode failed (status {status})")

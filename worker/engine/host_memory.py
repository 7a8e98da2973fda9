"""The process's heap policy for CPU inference, and memory on transparent huge pages.

glibc's malloc serves each large block (a prefill step's activations: megabytes each) with a fresh
mmap and returns it to the kernel on free, so every step faults its pages in again, zeroed: ~100k
page faults and ~7% of a prefill-heavy pass on the default model (2-core AVX512-BF16 Xeon,
bfloat16, 24 prompts of 64-330 tokens). Raising the mmap and trim thresholds keeps freed blocks in
the heap for the next step, as the tcmalloc that vLLM's CPU docs recommend preloading does.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import math
import mmap

import torch

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD_BYTES = 256 << 20    # blocks below this come from the heap (glibc caps it at 32 MB on its own)
TRIM_THRESHOLD_BYTES = 1 << 30      # free heap kept before any goes back to the kernel
TOP_PAD_BYTES = 64 << 20            # extra heap taken per growth


def _glibc(function: str):
    """The C library's `function`, or None where the C library is not glibc (musl, macOS)."""
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c")), function)
    except (OSError, AttributeError, TypeError):
        return None


@functools.cache
def retain_freed_memory() -> bool:
    """Once per process: set the thresholds where the C library is glibc. Says whether it did."""
    mallopt = _glibc("mallopt")
    if mallopt is None:   # leave the allocator alone
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    results = [mallopt(param, value) == 1 for param, value in (   # each tried, whatever the others say
        (_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES),
        (_M_TOP_PAD, TOP_PAD_BYTES))]
    done = all(results)
    if not done:
        log.warning("mallopt refused the heap thresholds; large activations will be mmapped per step")
    return done


# -- transparent huge pages --------------------------------------------------------------------------

HUGE_PAGE_BYTES = 2 << 20
_MAP_PRIVATE_ANONYMOUS = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)


@functools.cache
def transparent_huge_pages() -> str:
    """The kernel's THP mode: "always", "madvise", "never", or "" where there is none (not Linux)."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            text = f.read()
    except OSError:
        return ""
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else ""


def _advised_region(nbytes: int) -> torch.Tensor | None:
    """`nbytes` uint8 of an anonymous mapping that starts on a 2 MB boundary and is advised
    MADV_HUGEPAGE (THP's "madvise" mode, the usual default, gives huge pages only to memory so
    advised), zero until written and faulted in 2 MB at a time; None where that cannot be had
    (under 2 MB, no THP, madvise refused).

    Why: the KV cache and the weights are read in full every decode step, the cache in runs of a few
    KB (a block) scattered over ~1 GB, and each 4 KB page is a TLB miss, which a VM's nested page
    tables make expensive. On a 2-core Zen 4 VM, a decode step's attention over 24 rows took 18.5 ms
    on 4 KB pages and 16.9 on 2 MB pages (float32; benchmarks/hugepages.py)."""
    if (nbytes < HUGE_PAGE_BYTES or transparent_huge_pages() not in ("always", "madvise")
            or not hasattr(mmap, "MADV_HUGEPAGE") or not _MAP_PRIVATE_ANONYMOUS):
        return None
    size = -(-nbytes // HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES + HUGE_PAGE_BYTES   # room to align the start
    region = mmap.mmap(-1, size, flags=_MAP_PRIVATE_ANONYMOUS)
    try:
        region.madvise(mmap.MADV_HUGEPAGE)
    except OSError as exc:   # (a kernel without THP for anonymous memory, or THP disabled for the process)
        log.debug("madvise(MADV_HUGEPAGE) refused: %s", exc)
        region.close()
        return None
    offset = -ctypes.addressof(ctypes.c_char.from_buffer(region)) % HUGE_PAGE_BYTES
    # the tensor keeps `region` alive (torch.frombuffer holds the buffer); the mapping goes with the
    # last view of it
    return torch.frombuffer(region, dtype=torch.uint8, count=nbytes, offset=offset)


def huge_page_tensors(specs: list[tuple[tuple[int, ...], torch.dtype]]) -> list[torch.Tensor] | None:
    """Uninitialised tensors of these (shape, dtype)s, one after another in one _advised_region
    (each start 64-byte aligned), so that only the region's last 2 MB page is part empty, not one
    per tensor. None where there is no such region (no THP, or under 2 MB in all)."""
    offsets, total = [], 0
    for shape, dtype in specs:
        offsets.append(total)
        total += -(-math.prod(shape) * dtype.itemsize // 64) * 64
    region = _advised_region(total)
    if region is None:
        return None
    return [region[o:o + math.prod(shape) * dtype.itemsize].view(dtype).view(shape)
            for o, (shape, dtype) in zip(offsets, specs)]


MOVE_MAX_BYTES = 4 << 30   # weights above this stay put: the move holds two copies for a moment


def move_to_huge_pages(module: torch.nn.Module, min_bytes: int = 1 << 20) -> int:
    """Each CPU parameter and buffer of at least `min_bytes` copied into one huge_page_tensors region
    (a tensor shared by several modules, as tied embeddings, once). Returns the bytes moved (0 where
    there are no huge pages, or above MOVE_MAX_BYTES). The old copies are freed, and the heap's free
    top handed back to the kernel (malloc_trim), so that a model does not keep two."""
    chosen: dict[tuple, list[torch.Tensor]] = {}
    for t in [*module.parameters(), *module.buffers()]:
        if t.device.type == "cpu" and not t.is_sparse and t.numel() * t.element_size() >= min_bytes:
            chosen.setdefault((t.data_ptr(), tuple(t.shape), t.stride(), t.dtype), []).append(t)
    groups = list(chosen.values())
    total = sum(g[0].numel() * g[0].element_size() for g in groups)
    fresh = huge_page_tensors([(tuple(g[0].shape), g[0].dtype) for g in groups]) \
        if groups and total <= MOVE_MAX_BYTES else None
    if fresh is None:
        return 0
    for group, new in zip(groups, fresh):
        new.copy_(group[0].detach())
        for t in group:
            t.data = new
    _trim_heap()
    return total


def _trim_heap() -> None:
    malloc_trim = _glibc("malloc_trim")
    if malloc_trim is not None:
        malloc_trim(0)

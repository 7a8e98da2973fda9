"""The process's heap policy for CPU inference.

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

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD_BYTES = 256 << 20    # blocks below this come from the heap (glibc caps it at 32 MB on its own)
TRIM_THRESHOLD_BYTES = 1 << 30      # free heap kept before any goes back to the kernel
TOP_PAD_BYTES = 64 << 20            # extra heap taken per growth


@functools.cache
def retain_freed_memory() -> bool:
    """Once per process: set the thresholds where the C library is glibc. Says whether it did."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):   # not glibc (musl, macOS): leave the allocator alone
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    results = [mallopt(param, value) == 1 for param, value in (   # each tried, whatever the others say
        (_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES),
        (_M_TOP_PAD, TOP_PAD_BYTES))]
    done = all(results)
    if not done:
        log.warning("mallopt refused the heap thresholds; large activations will be mmapped per step")
    return done

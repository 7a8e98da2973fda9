"""The heap policy the engine sets on the CPU: large freed blocks stay in the heap for the next step
instead of being unmapped and faulted in again (worker/engine/host_memory.py)."""
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import resource, sys, torch
    from worker.engine.host_memory import retain_freed_memory

    def faults(rounds=10):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(rounds):
            torch.empty(64 << 20, dtype=torch.uint8).fill_(1)   # above glibc's largest own mmap threshold (32 MB)
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    default = faults()
    assert retain_freed_memory()
    faults(1)                      # the heap grows once
    print(default, faults())
""")


def _thp_always() -> bool:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[always]" in f.read()
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
@pytest.mark.skipif(bool(os.environ.get("LD_PRELOAD")), reason="a preloaded allocator (tcmalloc, jemalloc) serves malloc")
@pytest.mark.skipif(_thp_always(), reason="transparent huge pages: a 64 MB block faults in a few huge pages")
def test_large_blocks_are_reused_without_page_faults():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    if "AssertionError" in out.stderr:
        pytest.skip("not glibc: the allocator is left alone")
    assert out.returncode == 0, out.stderr
    default, retained = map(int, out.stdout.split())
    pages = 10 * (64 << 20) // 4096
    assert default > pages // 2          # each 64 MB block mmapped and faulted in again
    assert retained <= default // 4      # reused from the heap (seen: one block in ten faulted)

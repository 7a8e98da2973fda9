"""The heap policy the engine sets on the CPU: large freed blocks stay in the heap for the next step
instead of being unmapped and faulted in again (worker/engine/host_memory.py); the KV cache and the
weights in memory advised for transparent huge pages."""
import itertools
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from worker.engine import host_memory

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


# -- transparent huge pages ---------------------------------------------------------------------------

HUGE = host_memory.HUGE_PAGE_BYTES
needs_thp = pytest.mark.skipif(host_memory.transparent_huge_pages() not in ("always", "madvise"),
                               reason="no transparent huge pages for anonymous memory here")


def _advised(address: int) -> bool:
    """Whether the mapping that holds `address` was advised MADV_HUGEPAGE (its smaps VmFlags say "hg")."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and ":" not in head:
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == "VmFlags:":
                return "hg" in line.split()[1:]
    return False


@needs_thp
def test_huge_page_tensors_are_packed_in_one_advised_region():
    specs = [((1000, 700), torch.float32), ((3,), torch.bfloat16), ((513, 1024), torch.bfloat16)]
    tensors = host_memory.huge_page_tensors(specs)
    assert tensors is not None
    assert [(tuple(t.shape), t.dtype) for t in tensors] == [(s, d) for s, d in specs]
    assert tensors[0].data_ptr() % HUGE == 0 and all(t.data_ptr() % 64 == 0 for t in tensors)
    ends = [(t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in tensors]
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(ends))     # one after another, no overlap
    assert all(float(t.float().abs().sum()) == 0 for t in tensors)   # fresh anonymous memory reads 0
    for i, t in enumerate(tensors):
        t.fill_(i + 1)
    assert [float(t.float().mean()) for t in tensors] == [1.0, 2.0, 3.0]
    assert _advised(tensors[2].data_ptr())


@needs_thp
def test_moving_a_module_keeps_its_values_and_tied_weights():
    model = torch.nn.Sequential(torch.nn.Embedding(6000, 128), torch.nn.Linear(128, 6000), torch.nn.LayerNorm(128))
    model[1].weight = model[0].weight                       # tied, as a Llama LM head and its embeddings
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    small = model[2].weight.data_ptr()
    moved = host_memory.move_to_huge_pages(model, min_bytes=1 << 20)
    assert moved == 6000 * 128 * 4                          # the shared 3 MB once; the small ones stay
    assert model[1].weight.data_ptr() == model[0].weight.data_ptr() and _advised(model[0].weight.data_ptr())
    assert model[2].weight.data_ptr() == small
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), before[name]), name
    x = torch.randint(0, 6000, (4,))
    assert model[1](model[0](x)).shape == (4, 6000)         # still a working module


def test_without_huge_pages_nothing_moves(monkeypatch):
    monkeypatch.setattr(host_memory, "transparent_huge_pages", lambda: "never")
    assert host_memory.huge_page_tensors([((1 << 20,), torch.float32)]) is None
    model = torch.nn.Linear(1024, 1024)
    ptr = model.weight.data_ptr()
    assert host_memory.move_to_huge_pages(model) == 0 and model.weight.data_ptr() == ptr

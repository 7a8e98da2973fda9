"""What transparent huge pages buy a CPU decode step (worker/engine/host_memory.py): the same work on
tensors in ordinary memory (4 KB pages) and in `huge_page_tensors` memory (2 MB pages where the
kernel's THP mode allows), alternating in one process, medians.

  attention  the compiled paged-decode kernel, 24 decode rows over ~225 tokens each, 30 layers of
             SmolLM2-135M's shape (9 query heads, 3 KV heads, head_dim 64), blocks scattered over
             a pool the size of the engine's default 1 GiB float32 cache
  linear     SmolLM2-135M's 120 layer matmuls (425 MB of float32 weights) at 1 and 24 rows, as
             benchmarks/cpu_linear.py

Not part of `make test`.

    python benchmarks/hugepages.py [--rounds 16]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cpu_info  # (benchmarks/)

from kernels import cpu_kernels
from worker.engine.host_memory import huge_page_tensors, transparent_huge_pages

SHAPES = [(576, 960), (576, 576), (576, 3072), (1536, 576)]   # (in, out): qkv, o, gate|up, down
LAYERS, ROWS, CTX, HEADS, KV_HEADS, HEAD_DIM, BLOCK = 30, 24, 260, 9, 3, 64, 16


def alternate(runs: dict, rounds: int) -> dict[str, float]:
    """Median ms of each callable, run in alternating order."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for r in range(rounds):
        for name in names if r % 2 else names[::-1]:
            start = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1000 for name, t in times.items()}


def copies(tensors: list[torch.Tensor]) -> dict[str, list[torch.Tensor]]:
    huge = huge_page_tensors([(tuple(t.shape), t.dtype) for t in tensors])
    if huge is None:
        raise SystemExit(f"no transparent huge pages here (mode {transparent_huge_pages()!r})")
    for dst, src in zip(huge, tensors):
        dst.copy_(src)
    return {"4 KB pages": tensors, "2 MB pages": huge}


def attention(dtype: torch.dtype, rounds: int) -> dict[str, float]:
    blocks = (1 << 30) // (2 * LAYERS * BLOCK * KV_HEADS * HEAD_DIM * 4)
    caches = copies([torch.randn(blocks, BLOCK, KV_HEADS, HEAD_DIM).to(dtype) for _ in range(2 * LAYERS)])
    per_seq = -(-CTX // BLOCK)
    tables = torch.randperm(blocks)[:ROWS * per_seq].view(ROWS, per_seq).to(torch.int32)
    lens = torch.tensor([CTX - 3 * i for i in range(ROWS)], dtype=torch.int32)
    rows = torch.arange(ROWS, dtype=torch.int64)
    q = torch.randn(ROWS, HEADS, HEAD_DIM).to(dtype)
    out = torch.empty_like(q)

    def step(cache):
        def run():
            for layer in range(LAYERS):
                cpu_kernels.paged_decode(q, cache[2 * layer], cache[2 * layer + 1], tables, lens, rows, 0.125, out)
        return run

    return alternate({name: step(c) for name, c in caches.items()}, rounds)


def linear(dtype: torch.dtype, rows: int, weights: dict[str, list[torch.Tensor]], rounds: int) -> dict[str, float]:
    xs = {k: torch.randn(rows, k).to(dtype) for k, _ in SHAPES}

    def step(ws):
        def run():
            for w in ws:
                cpu_kernels.linear(xs[w.shape[1]], w)
        return run

    return alternate({name: step(ws) for name, ws in weights.items()}, rounds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=16)
    args = ap.parse_args()
    torch.manual_seed(0)
    mode = transparent_huge_pages()
    print(f"{cpu_info.describe()}; THP mode {mode!r}; torch threads {torch.get_num_threads()}")
    if mode == "always":
        print("note: THP mode 'always' may put the '4 KB pages' tensors on huge pages too (khugepaged)")
    print(f"{'case':<34}{'4 KB pages ms':>15}{'2 MB pages ms':>15}{'ratio':>8}")
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        cases = [(f"attention {ROWS} rows, {name}", attention(dtype, args.rounds))]
        weights = copies([torch.randn(o, i).to(dtype) for _ in range(LAYERS) for i, o in SHAPES])
        cases += [(f"linear {rows} rows, {name}", linear(dtype, rows, weights, args.rounds)) for rows in (1, ROWS)]
        for label, ms in cases:
            small, huge = ms["4 KB pages"], ms["2 MB pages"]
            print(f"{label:<34}{small:>15.2f}{huge:>15.2f}{huge / small:>8.3f}")


if __name__ == "__main__":
    main()

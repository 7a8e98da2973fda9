"""The compiled CPU decode attention (kernels/cpu_kernels.py `paged_decode`) on SmolLM2-135M's shape:
one decode step's 30 layers, each its own float32 KV cache on huge pages (9 query / 3 KV heads, head
dim 64, 16-token blocks), `--rows` sequences of about `--context` tokens.

Two layouts: the sequences' blocks scattered through the cache (shuffled, as a busy engine leaves
them: the step reads its KV from memory) and every sequence on the same few blocks (the KV stays in
cache: what the arithmetic alone costs). Builds named with `--variant` (compiler flags, comma
separated, e.g. `-DGENQ_ROW_HEADS_TOGETHER=0`) run alternately with the engine's build in one
process, their outputs compared with it first (a difference is printed). Prints the CPU flags.

    python benchmarks/cpu_decode_attention.py [--rows 24] [--context 270] [--rounds 15] [--variant FLAGS ...]
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cpu_info  # noqa: E402  (benchmarks/)
from kernels import cpu_kernels
from worker.engine.host_memory import huge_page_tensors

LAYERS, BLOCK, KV_HEADS, HEADS, HEAD_DIM = 30, 16, 3, 9, 64


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=24)
    ap.add_argument("--context", type=int, default=270, help="the longest context; others up to 60 shorter")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="of the cache and queries")
    ap.add_argument("--variant", action="append", default=[], help="compiler flags of another build, comma separated")
    args = ap.parse_args()
    if not cpu_kernels.available():
        print("the compiled kernels are not available here (no C compiler)")
        return
    print(f"CPU: {cpu_info.describe()}")
    builds = {"engine's build": cpu_kernels.library()}
    for flags in args.variant:
        builds[flags] = cpu_kernels.build_variant(*flags.split(","))
    rng = random.Random(0)
    per_seq = (args.context + BLOCK - 1) // BLOCK
    num_blocks = args.rows * per_seq + 8
    shape = (num_blocks, BLOCK, KV_HEADS, HEAD_DIM)
    dtype = getattr(torch, args.dtype)
    caches = huge_page_tensors([(shape, dtype)] * (2 * LAYERS)) or [torch.empty(shape, dtype=dtype) for _ in range(2 * LAYERS)]
    for cache in caches:
        cache.copy_(torch.randn(shape))
    order = list(range(num_blocks))
    rng.shuffle(order)
    layouts = {"scattered": torch.tensor([order[s * per_seq:(s + 1) * per_seq] for s in range(args.rows)], dtype=torch.int32),
               "shared": torch.tensor([list(range(per_seq))] * args.rows, dtype=torch.int32)}
    lens = torch.tensor([args.context - rng.randrange(0, 60) for _ in range(args.rows)], dtype=torch.int32)
    rows = torch.arange(args.rows, dtype=torch.int64)
    q = torch.randn(args.rows, HEADS, HEAD_DIM).to(dtype)

    def step(lib, tables, out, layers=LAYERS) -> float:
        start = time.perf_counter()
        for layer in range(layers):
            k, v = caches[2 * layer], caches[2 * layer + 1]
            status = lib.genq_paged_decode(q.data_ptr(), q.stride(0), k.data_ptr(), v.data_ptr(), out.data_ptr(),
                                           cpu_kernels.DTYPES[dtype],
                                           tables.data_ptr(), tables.stride(0), lens.data_ptr(), rows.data_ptr(),
                                           args.rows, HEADS, KV_HEADS, HEAD_DIM, BLOCK, HEAD_DIM ** -0.5,
                                           torch.get_num_threads())
            if status != 0:
                raise RuntimeError(f"genq_paged_decode failed ({status})")
        return time.perf_counter() - start

    reference = torch.empty_like(q)
    step(builds["engine's build"], layouts["scattered"], reference, 1)
    for name, lib in builds.items():
        out = torch.empty_like(q)
        step(lib, layouts["scattered"], out, 1)
        if not torch.equal(out, reference):   # (a build that sums in another order: say by how much)
            diff = (out.float() - reference.float()).abs().max().item()
            print(f"{name}: output differs from the engine's build by up to {diff:.3g} "
                  f"(largest output {reference.float().abs().max().item():.3g})")
    out = torch.empty_like(q)
    times = {(name, layout): [] for name in builds for layout in layouts}
    for _ in range(args.rounds):
        for name, lib in builds.items():
            for layout, tables in layouts.items():
                times[name, layout].append(step(lib, tables, out))
    kv_bytes = int(lens.sum()) * KV_HEADS * HEAD_DIM * caches[0].element_size() * 2 * LAYERS
    print(f"{args.rows} rows, contexts {int(lens.min())}-{int(lens.max())}, {LAYERS} layers, "
          f"{kv_bytes / 1e6:.0f} MB of {args.dtype} KV a step; {torch.get_num_threads()} threads; median of {args.rounds}")
    base = statistics.median(times["engine's build", "scattered"])
    for name in builds:
        scattered = statistics.median(times[name, "scattered"])
        shared = statistics.median(times[name, "shared"])
        print(f"  {name:>34}: scattered {scattered * 1e3:6.1f} ms ({kv_bytes / scattered / 1e9:4.1f} GB/s, "
              f"{scattered / base:.3f}x), shared blocks {shared * 1e3:6.1f} ms")


if __name__ == "__main__":
    main()

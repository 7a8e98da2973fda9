"""The compiled CPU linear kernel (kernels/cpu_kernels.py `linear`) against torch.nn.functional.linear
(the BLAS PyTorch was built with), float32 or bfloat16, at the batch sizes a decode step has. Also,
where they run: oneDNN on packed weights (what the engine uses above the kernel's row limit), the
kernel on bfloat16 weights' tile-packed copies (`pack_tiles`: AMX tiles, or vdpbf16ps as an outer
product where the CPU has AVX512-BF16 only), and on a CPU with AMX the kernel's bfloat16 path with the
tiles turned off (vdpbf16ps alone).

One "pass" = the 120 layer matmuls of SmolLM2-135M (30 layers x qkv, o, gate|up, down; 120 distinct
weights, 425 MB, so each pass streams them from memory as a decode step does). They run in
alternation, median of several rounds, in one process.

    python benchmarks/cpu_linear.py [--dtype bfloat16] [--rows 1 4 8 16 32 48 64 128] [--rounds 5] [--json out.json]
                                    [--variant FLAGS ...]   # e.g. --variant=-DAMX_PREFETCH=0
                                    [--source REV ...]      # the kernel of an earlier commit, e.g. --source HEAD~3
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cpu_info  # noqa: E402  (benchmarks/)
from kernels import cpu_kernels
from kernels.linear import onednn_available, prepack

SHAPES = [(576, 960), (576, 576), (576, 3072), (1536, 576)]   # (in, out): qkv, o, gate|up, down


def one_pass(fn, xs, weights) -> float:
    start = time.perf_counter()
    for w in weights:
        fn(xs[w.shape[1]], w)
    return time.perf_counter() - start


def source_at(rev: str) -> Path:
    """kernels/cpu/cpu_kernels.c as it was at git revision `rev`, in a file of its own."""
    root = Path(__file__).resolve().parents[1]
    text = subprocess.run(["git", "show", f"{rev}:kernels/cpu/cpu_kernels.c"], cwd=root, check=True,
                          capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp(prefix="genq-kernel-")) / "cpu_kernels.c"
    path.write_text(text)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 24, 32, 48, 64, 128])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--json", default=None)
    ap.add_argument("--variant", action="append", default=[],
                    help="compiler flags of another build of the kernel, comma separated (a column of its own)")
    ap.add_argument("--source", action="append", default=[],
                    help="a git revision: the kernel built from its kernels/cpu/cpu_kernels.c (a column of its own)")
    args = ap.parse_args()
    if not cpu_kernels.linear_available():
        print("the linear kernel is not available here (it needs AVX-512 or AVX2 with FMA, and a C compiler)")
        return
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    weights = [torch.randn(n, k).to(dtype) for _ in range(30) for k, n in SHAPES]
    kernel = cpu_kernels.linear_unchecked   # (no row limit here)
    print(f"CPU: {cpu_info.describe()}")
    print(f"torch threads {torch.get_num_threads()}; one pass = {len(weights)} matmuls, "
          f"{sum(w.numel() for w in weights) * dtype.itemsize / 1e6:.0f} MB of {args.dtype} weights"
          + ("" if args.dtype == "float32" else f"; this CPU has bfloat16 arithmetic: {cpu_kernels.native_bfloat16()}"))
    packed = {id(w): prepack(w) for w in weights} if onednn_available() else {}

    def onednn(x, w):
        return torch.ops.mkldnn._linear_pointwise(x, packed[id(w)], None, "none", [], "")

    sides = {"torch": torch.nn.functional.linear, "kernel": kernel}
    # (a CPU without bfloat16 arithmetic packs bfloat16 weights widened: the engine multiplies those in float32)
    if packed and all(p is not None and p.dtype == dtype for p in packed.values()):
        sides["onednn packed"] = onednn
    for flags in args.variant:
        sides[flags] = functools.partial(kernel, lib=cpu_kernels.build_variant(*flags.split(",")))
    for rev in args.source:
        sides[f"@{rev}"] = functools.partial(kernel, lib=cpu_kernels.build_variant(source=source_at(rev)))
    if dtype == torch.bfloat16 and cpu_kernels.linear_native_bfloat16():
        tiles = {id(w): cpu_kernels.pack_tiles(w) for w in weights}   # (AMX tiles, else vdpbf16ps outer products)
        sides["kernel, tile-packed W"] = lambda x, w: kernel(x, w, tiles=tiles[id(w)])   # (the engine's, to 1,024 rows)
        if cpu_kernels.linear_amx():
            sides["kernel (no AMX)"] = kernel   # timed with the tiles off (`run`)

    def run(name, fn, xs):
        if name != "kernel (no AMX)":
            return one_pass(fn, xs, weights)
        cpu_kernels.linear_amx(False)
        try:
            return one_pass(fn, xs, weights)
        finally:
            cpu_kernels.linear_amx(True)

    print(f"{'rows':>5}" + "".join(f"{name + ' ms':>20}" for name in sides)
          + f" {'kernel vs torch':>16} {'kernel GFLOP/s':>15}")
    results = []
    for m in args.rows:
        xs = {k: torch.randn(m, k).to(dtype) for k, _ in SHAPES}
        tol = 1e-3 if dtype == torch.float32 else 2e-2   # (sums of 1,536 in another order: 1e-4 failed at times)
        for w in weights[:8]:
            for fn in sides.values():
                assert torch.allclose(fn(xs[w.shape[1]], w).float(),
                                      torch.nn.functional.linear(xs[w.shape[1]], w).float(), rtol=tol, atol=tol)
        times = {name: [] for name in sides}
        for name, fn in sides.items():   # warm-up
            run(name, fn, xs)
        for _ in range(args.rounds):
            for name, fn in sides.items():
                times[name].append(run(name, fn, xs))
        med = {name: statistics.median(ts) for name, ts in times.items()}
        t, k = med["torch"], med["kernel"]
        flops = sum(2 * m * w.numel() for w in weights)
        results.append({"rows": m, **{f"{name}_s": v for name, v in med.items()}, "speedup": t / k,
                        "kernel_gflops": flops / k / 1e9})
        print(f"{m:5d}" + "".join(f"{v * 1e3:20.1f}" for v in med.values())
              + f" {t / k:15.2f}x {flops / k / 1e9:15.1f}")
    print(f"the engine uses the kernel up to {cpu_kernels.linear_max_rows(dtype)} rows ({args.dtype}; AMX tiles: "
          f"{cpu_kernels.linear_amx()}, with tile-packed weights up to {cpu_kernels.LINEAR_MAX_ROWS_TILES} rows)")
    if args.json:
        Path(args.json).write_text(json.dumps({"threads": torch.get_num_threads(), "dtype": args.dtype, "results": results}, indent=2))


if __name__ == "__main__":
    main()

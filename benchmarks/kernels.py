"""Kernel benchmark: each Triton kernel against its PyTorch reference on one CUDA device.

For every case: median time over many runs (CUDA events, after warm-up, L2 flushed before each
run), the bytes the kernel must move at minimum, achieved GB/s and that as a fraction of the
device's measured copy bandwidth (a large device-to-device copy, read + write counted). The
reference runs beside it in the same process; outputs are checked against it before timing.

    python benchmarks/kernels.py [--reps 100] [--warmup 10] [--json benchmarks/results/kernels.json]

Headline: decode attention, batch 64, context 2048, 32 query / 8 KV heads, head dim 128, bfloat16.
Targets: >= 70% of copy bandwidth and >= 3x the reference. On a machine without CUDA it says so
and exits 0.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

HEADLINE = "paged_attention decode b64 ctx2048"
TARGET_FRACTION_OF_COPY = 0.70
TARGET_SPEEDUP = 3.0


@dataclass
class Case:
    name: str
    bytes_moved: int
    run: dict                  # impl name -> zero-argument callable
    check: tuple | None = None  # (triton callable, torch callable) returning comparable outputs
    notes: str = ""


@dataclass
class Row:
    case: str
    impl: str
    time_us: float
    bytes_moved: int
    gb_per_s: float
    fraction_of_copy: float
    speedup_vs_torch: float | None = None
    rel_err_vs_torch: float | None = None
    notes: str = ""
    extra: dict = field(default_factory=dict)


class Timer:
    def __init__(self, reps: int, warmup: int):
        self.reps, self.warmup = reps, warmup
        # Larger than any L2 (H100: 50 MB): zeroing it between runs evicts the previous run's data.
        self.flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")

    def median_us(self, fn) -> float:
        for _ in range(self.warmup):
            fn()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(self.reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(self.reps)]
        for start, end in zip(starts, ends):
            self.flush.zero_()
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)) * 1e3


def copy_bandwidth_gbs(timer: Timer, nbytes: int = 1 << 30) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    t_us = timer.median_us(lambda: dst.copy_(src))
    return 2 * nbytes / (t_us * 1e-6) / 1e9


def attention_case(name, seqs, *, num_heads=32, num_kv_heads=8, head_dim=128, block_size=16,
                   dtype=torch.bfloat16, num_splits=None, with_reference=True, notes=""):
    """seqs: [(cached tokens before the step, new query tokens)]. Blocks are scattered at random."""
    import kernels
    from kernels.triton.paged_attention import paged_attention_triton

    g = torch.Generator(device="cuda").manual_seed(0)
    seq_lens = [c + n for c, n in seqs]
    per_seq = [math.ceil(s / block_size) for s in seq_lens]
    width, num_blocks = max(per_seq), sum(per_seq)
    perm = torch.randperm(num_blocks, device="cuda", generator=g).to(torch.int32)
    block_tables = torch.zeros(len(seqs), width, dtype=torch.int32, device="cuda")
    offset = 0
    for i, n in enumerate(per_seq):
        block_tables[i, :n] = perm[offset:offset + n]
        offset += n
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, device="cuda", dtype=dtype, generator=g)
    v_cache = torch.randn(shape, device="cuda", dtype=dtype, generator=g)
    q_lens = [n for _, n in seqs]
    qsl = torch.tensor([0] + q_lens, device="cuda").cumsum(0).to(torch.int32)
    q = torch.randn(sum(q_lens), num_heads, head_dim, device="cuda", dtype=dtype, generator=g)
    seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32, device="cuda")
    scale = head_dim ** -0.5
    elt = k_cache.element_size()
    # Every cached key and value of each sequence once, the queries in and the outputs out.
    nbytes = 2 * sum(seq_lens) * num_kv_heads * head_dim * elt + 2 * q.numel() * elt + block_tables.numel() * 4

    def triton_fn():
        return paged_attention_triton(q, k_cache, v_cache, block_tables, seq_lens_t, qsl, scale,
                                      num_splits=num_splits)

    def torch_fn():
        return kernels.paged_attention(q, k_cache, v_cache, block_tables, seq_lens_t, qsl, scale, impl="torch")

    run = {"triton": triton_fn}
    if with_reference:
        run["torch"] = torch_fn
    return Case(name, nbytes, run, check=(triton_fn, torch_fn), notes=notes)


def store_kv_case(name, num_tokens, *, num_kv_heads=8, head_dim=128, block_size=16, dtype=torch.bfloat16):
    import kernels

    g = torch.Generator(device="cuda").manual_seed(1)
    num_blocks = math.ceil(num_tokens / block_size) * 4
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.zeros(shape, device="cuda", dtype=dtype)
    v_cache = torch.zeros(shape, device="cuda", dtype=dtype)
    k = torch.randn(num_tokens, num_kv_heads, head_dim, device="cuda", dtype=dtype, generator=g)
    v = torch.randn_like(k)
    slots = torch.randperm(num_blocks * block_size, device="cuda", generator=g)[:num_tokens]
    nbytes = 2 * 2 * k.numel() * k.element_size() + slots.numel() * slots.element_size()

    def call(impl):
        def fn():
            kernels.store_kv(k, v, k_cache, v_cache, slots, impl=impl)
            return torch.cat([k_cache.flatten(), v_cache.flatten()])
        return fn

    return Case(name, nbytes, {"triton": call("triton"), "torch": call("torch")}, check=(call("triton"), call("torch")))


def rms_norm_case(name, num_tokens, hidden, *, dtype=torch.bfloat16):
    import kernels

    g = torch.Generator(device="cuda").manual_seed(2)
    x = torch.randn(num_tokens, hidden, device="cuda", dtype=dtype, generator=g)
    residual = torch.randn_like(x)
    weight = torch.randn(hidden, device="cuda", dtype=dtype, generator=g)
    elt = x.element_size()
    nbytes = 4 * x.numel() * elt + hidden * elt  # x, residual in; out, new residual out

    def call(impl):
        return lambda: torch.cat([t.flatten() for t in kernels.rms_norm(x, weight, 1e-6, residual, impl=impl)])

    return Case(name, nbytes, {"triton": call("triton"), "torch": call("torch")}, check=(call("triton"), call("torch")))


def rotary_case(name, num_tokens, *, num_heads=32, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16):
    import kernels

    g = torch.Generator(device="cuda").manual_seed(3)
    q0 = torch.randn(num_tokens, num_heads, head_dim, device="cuda", dtype=dtype, generator=g)
    k0 = torch.randn(num_tokens, num_kv_heads, head_dim, device="cuda", dtype=dtype, generator=g)
    q, k = q0.clone(), k0.clone()
    positions = torch.randint(0, 4096, (num_tokens,), device="cuda", generator=g)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, head_dim, 2, device="cuda").float() / head_dim)
    freqs = torch.outer(torch.arange(4096, device="cuda").float(), inv_freq)
    cache = torch.cat([freqs.cos(), freqs.sin()], -1)
    elt = q.element_size()
    nbytes = 2 * (q.numel() + k.numel()) * elt + num_tokens * head_dim * cache.element_size()

    def call(impl):  # in place: timing rotates the same buffers again, which moves the same bytes
        return lambda: kernels.rotary_embedding(positions, q, k, cache, impl=impl)

    def checked(impl):
        def fn():
            q.copy_(q0)
            k.copy_(k0)
            kernels.rotary_embedding(positions, q, k, cache, impl=impl)
            return torch.cat([q.flatten(), k.flatten()])
        return fn

    return Case(name, nbytes, {"triton": call("triton"), "torch": call("torch")},
                check=(checked("triton"), checked("torch")))


def build_cases() -> list[Case]:
    decode = [(2047, 1)] * 64
    # Four 512-token prefill chunks on top of 1024 cached tokens, beside 60 decode rows.
    mixed = [(1024, 512)] * 4 + [(2047, 1)] * 60
    cases = [
        attention_case(HEADLINE, decode, notes="headline"),
        *[attention_case(f"{HEADLINE} splits={s}", decode, num_splits=s, with_reference=False,
                         notes="split sweep") for s in (1, 2, 4, 8)],
        attention_case("paged_attention decode b8 ctx8192", [(8191, 1)] * 8, notes="few long sequences"),
        *[attention_case(f"paged_attention decode b8 ctx8192 splits={s}", [(8191, 1)] * 8, num_splits=s,
                         with_reference=False, notes="split sweep") for s in (4, 8, 16)],
        attention_case("paged_attention decode b256 ctx1024 9/3 heads d64", [(1023, 1)] * 256, num_heads=9,
                       num_kv_heads=3, head_dim=64, notes="SmolLM2-135M's shapes"),
        *[attention_case(f"paged_attention decode b256 ctx1024 9/3 heads d64 splits={s}", [(1023, 1)] * 256,
                         num_heads=9, num_kv_heads=3, head_dim=64, num_splits=s, with_reference=False,
                         notes="split sweep") for s in (1, 2)],
        attention_case("paged_attention mixed 4x512 prefill + 60 decode", mixed),
        attention_case("paged_attention decode b64 ctx2048 fp16 d64 bs32", decode, head_dim=64, block_size=32,
                       dtype=torch.float16),
        store_kv_case("store_kv decode 64 tokens", 64),
        store_kv_case("store_kv prefill 8192 tokens", 8192),
        rms_norm_case("rms_norm+residual 4096x4096", 4096, 4096),
        rotary_case("rotary 4096 tokens 32/8 heads", 4096),
    ]
    return cases


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "kernels.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/kernels.py needs a CUDA device (none found); nothing to measure.")
        return 0
    try:
        import triton  # noqa: F401
    except ImportError:
        print("benchmarks/kernels.py needs the triton package; nothing to measure.")
        return 0

    timer = Timer(args.reps, args.warmup)
    copy_bw = copy_bandwidth_gbs(timer)
    device = torch.cuda.get_device_name()
    print(f"device: {device}   measured copy bandwidth: {copy_bw:.0f} GB/s (1 GiB device-to-device, read+write)")

    rows: list[Row] = []
    for case in build_cases():
        err = None
        if case.check is not None:
            err = rel_err(case.check[0](), case.check[1]())
        times = {impl: timer.median_us(fn) for impl, fn in case.run.items()}
        for impl, t_us in times.items():
            gbs = case.bytes_moved / (t_us * 1e-6) / 1e9
            speedup = times["torch"] / t_us if impl == "triton" and "torch" in times else None
            rows.append(Row(case.name, impl, t_us, case.bytes_moved, gbs, gbs / copy_bw, speedup,
                            err if impl == "triton" else None, case.notes))
        torch.cuda.empty_cache()

    header = f"{'case':<50} {'impl':<7} {'time us':>10} {'MB':>9} {'GB/s':>8} {'% copy':>7} {'vs torch':>9} {'rel err':>9}"
    print(header)
    print("-" * len(header))
    for r in rows:
        speed = f"{r.speedup_vs_torch:.2f}x" if r.speedup_vs_torch else ""
        err = f"{r.rel_err_vs_torch:.1e}" if r.rel_err_vs_torch is not None else ""
        print(f"{r.case:<50} {r.impl:<7} {r.time_us:>10.1f} {r.bytes_moved / 1e6:>9.1f} {r.gb_per_s:>8.0f} "
              f"{100 * r.fraction_of_copy:>6.1f}% {speed:>9} {err:>9}")

    head = next(r for r in rows if r.case == HEADLINE and r.impl == "triton")
    targets = {
        "fraction_of_copy": {"value": head.fraction_of_copy, "target": TARGET_FRACTION_OF_COPY,
                             "met": head.fraction_of_copy >= TARGET_FRACTION_OF_COPY},
        "speedup_vs_torch": {"value": head.speedup_vs_torch, "target": TARGET_SPEEDUP,
                             "met": (head.speedup_vs_torch or 0) >= TARGET_SPEEDUP},
    }
    for key, t in targets.items():
        print(f"headline {key}: {t['value']:.3f} (target {t['target']}) {'met' if t['met'] else 'NOT met'}")

    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "device": device, "torch": torch.__version__, "triton": triton.__version__,
        "copy_bandwidth_gb_per_s": copy_bw, "reps": args.reps, "warmup": args.warmup,
        "headline": HEADLINE, "targets": targets, "rows": [asdict(r) for r in rows],
    }, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

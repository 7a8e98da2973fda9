"""Compile every Triton kernel ahead of time for real NVIDIA GPUs, without a GPU or the interpreter.

The interpreter accepts things the GPU compiler rejects (dot shapes under 16, non-power-of-2
blocks, types that change across a loop); this runs the real compiler down to a cubin for each
kernel in the configurations its wrapper launches, and reports registers, spills and shared memory
(from ptxas -v) so tile choices can be judged without a device. TRITON_INTERPRET must be unset:
    python tests/kernels/gpu_compile.py [--quick] [sm ...]      (default: sm_90)
Exits non-zero if any kernel fails to compile.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from kernels.triton.kv_cache import _store_kv_kernel
from kernels.triton.paged_attention import _launch_config, _merge_splits_kernel, _paged_attention_kernel
from kernels.triton.rms_norm import _rms_norm_kernel
from kernels.triton.rotary import _rotary_kernel

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _source(fn, pointers: dict[str, str], floats=(), constexprs: dict | None = None) -> ASTSource:
    """What the launcher builds for realistic tensors: pointers by name with their element type,
    named float args fp32, every other runtime arg i32; unit strides along the last dim
    specialised to 1, and pointers and other strides marked divisible by 16 (true for contiguous
    tensors with head_dim 64/128), which is what lets loads vectorise and pipeline."""
    constexprs = dict(constexprs or {})
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = "*" + pointers[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in floats:
            sig[name] = "fp32"
        elif name.startswith("stride_") and name.endswith("d"):
            sig[name] = "constexpr"
            constexprs[name] = 1
        else:
            sig[name] = "i32"
            if name.startswith("stride_"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    return ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)


def _attention(dt, head_dim, group, decode_only, splits):
    cfg = dict(_launch_config(decode_only, group, head_dim, DTYPES[dt]))
    launch = {"num_warps": cfg.pop("num_warps"), "num_stages": cfg.pop("num_stages")}
    ptrs = dict(q_ptr=dt, k_cache_ptr=dt, v_cache_ptr=dt, block_tables_ptr="i32", seq_lens_ptr="i32",
                qsl_ptr="i32", out_ptr=dt, m_ptr="fp32", l_ptr="fp32", acc_ptr="fp32")
    const = dict(GROUP=group, BLOCK_SIZE=16, HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim,
                 BLOCK_Q=cfg["BLOCK_M"] // group, NUM_SPLITS=splits,
                 DOT_PRECISION="ieee" if dt == "fp32" else "tf32", DOT_IN_FP32=False, **cfg)
    name = f"paged_attention {dt} d{head_dim} group{group} {'decode' if decode_only else 'mixed'} splits{splits}"
    return name, _source(_paged_attention_kernel, ptrs, ("qk_scale",), const), launch


def _merge(dt, head_dim, group):
    ptrs = dict(m_ptr="fp32", l_ptr="fp32", acc_ptr="fp32", out_ptr=dt)
    const = dict(GROUP=group, GROUP_PAD=group, HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim, NUM_SPLITS=4, SPLITS_PAD=4)
    return f"merge_splits {dt} d{head_dim} group{group}", _source(_merge_splits_kernel, ptrs, (), const), {"num_warps": 4}


def _small_kernels(dt):
    ptrs = dict(k_ptr=dt, v_ptr=dt, k_cache_ptr=dt, v_cache_ptr=dt, slot_ptr="i64")
    yield (f"store_kv {dt}", _source(_store_kv_kernel, ptrs, (), dict(BLOCK_SIZE=16, BLOCK_H=8, BLOCK_D=128)),
           {"num_warps": 4})
    for residual in (False, True):
        ptrs = dict(x_ptr=dt, res_ptr=dt, w_ptr=dt, out_ptr=dt, new_res_ptr=dt)
        yield (f"rms_norm {dt} residual={residual}",
               _source(_rms_norm_kernel, ptrs, ("eps",), dict(HAS_RESIDUAL=residual, BLOCK=4096)), {"num_warps": 16})
    ptrs = dict(pos_ptr="i64", q_ptr=dt, k_ptr=dt, cache_ptr="fp32")
    yield (f"rotary {dt}", _source(_rotary_kernel, ptrs, (), dict(BLOCK_HQ=32, BLOCK_HK=8, BLOCK_HALF=64)),
           {"num_warps": 4})


def cases(quick: bool):
    if quick:  # one of each code path; the full matrix takes minutes
        yield _attention("bf16", 128, 4, True, 1)
        yield _attention("bf16", 128, 4, True, 4)
        yield _attention("bf16", 64, 8, False, 1)
        yield _attention("fp32", 128, 4, True, 1)
        yield _merge("bf16", 128, 4)
        yield from _small_kernels("bf16")
        return
    for dt in DTYPES:
        for head_dim in (64, 128):
            for group in (1, 4, 8):
                for decode_only in (True, False):
                    for splits in (1, 4):
                        yield _attention(dt, head_dim, group, decode_only, splits)
                yield _merge(dt, head_dim, group)
        yield from _small_kernels(dt)


def _resources(compiled, arch: int) -> str:
    """Registers and spills from ptxas -v on the kernel's PTX (a CompiledKernel only learns its
    register count once loaded on a device)."""
    from triton.backends.nvidia.compiler import get_ptxas
    suffix = "a" if arch >= 90 else ""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(compiled.asm["ptx"])
        f.flush()
        res = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name=sm_{arch}{suffix}", f.name, "-o", os.devnull],
                             capture_output=True, text=True)
    regs = re.search(r"Used (\d+) registers", res.stderr)
    spills = re.search(r"(\d+) bytes spill stores", res.stderr)
    return f"regs={regs.group(1) if regs else '?'} spill_bytes={spills.group(1) if spills else '?'}"


def main(argv: list[str]) -> int:
    quick = "--quick" in argv
    archs = [int(a) for a in argv if a != "--quick"] or [90]
    failures = 0
    for arch in archs:
        target = GPUTarget("cuda", arch, 32)
        for name, src, launch in cases(quick):
            t0 = time.perf_counter()
            try:
                compiled = triton.compile(src, target=target, options=launch)
            except Exception as exc:  # report every failure, not only the first
                failures += 1
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                print(f"FAIL sm_{arch} {name}: {type(exc).__name__}: {first}", flush=True)
                continue
            print(f"ok   sm_{arch} {name}: {_resources(compiled, arch)} smem={compiled.metadata.shared} "
                  f"({time.perf_counter() - t0:.1f}s)", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

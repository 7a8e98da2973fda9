"""Linear layers: y = x W^T + b, W in nn.Linear's [out_features, in_features] layout."""
from __future__ import annotations

import functools

import torch

from kernels._dispatch import resolve_impl


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           impl: str | None = None, packed: torch.Tensor | None = None,
           tiles: torch.Tensor | None = None) -> torch.Tensor:
    """x: [..., in_features]. On the CPU, decode-sized batches (at most `cpu_kernels.linear_max_rows(dtype)`
    rows: LINEAR_MAX_ROWS) of float32, and of bfloat16 where the CPU has no bfloat16 arithmetic (at most
    LINEAR_MAX_ROWS_WIDENED_BF16), go to the compiled kernel, as do bfloat16 batches of at most
    LINEAR_MAX_ROWS_NATIVE_BF16 rows where it has (vdpbf16ps, or AMX tiles); larger bfloat16 batches on a CPU without
    it are multiplied in float32 (exact widening, float32 sums, one rounding: what the BLAS does, at the float32
    rate instead of the emulated bfloat16 one); larger float32 batches, and larger bfloat16 ones where the CPU
    has bfloat16 arithmetic, go to oneDNN (`onednn_available`; `packed`: the weight's `prepack` copy).
    `tiles`: the weight's `cpu_kernels.pack_tiles` copy, with which bfloat16 batches of up to
    LINEAR_MAX_ROWS_TILES rows take the kernel's packed path (AMX tiles, or vdpbf16ps as an outer
    product). Everything else, and impl="torch" or "triton" (cuBLAS does this well), is
    torch.nn.functional.linear."""
    if resolve_impl(impl, x) == "cpu":
        from kernels import cpu_kernels

        emulated_bf16 = x.dtype == torch.bfloat16 and not cpu_kernels.native_bfloat16()
        few_rows = x.numel() <= cpu_kernels.linear_max_rows(x.dtype) * x.shape[-1]
        if x.dtype == torch.float32 or emulated_bf16:
            if few_rows and cpu_kernels.linear_supports(x, weight, bias) and cpu_kernels.linear_available():
                return cpu_kernels.linear_unchecked(x, weight, bias)
        elif x.dtype == torch.bfloat16 and cpu_kernels.linear_native_bfloat16():
            if tiles is not None and cpu_kernels.linear_supports(x, weight, bias, cpu_kernels.LINEAR_MAX_ROWS_TILES):
                return cpu_kernels.linear_unchecked(x, weight, bias, tiles=tiles)
            if few_rows and cpu_kernels.linear_supports(x, weight, bias):
                return cpu_kernels.linear_unchecked(x, weight, bias)
        if emulated_bf16 and weight.dtype == torch.bfloat16 and x.device.type == "cpu":
            # multiplied in float32: by oneDNN, on prepack's widened copy or the weight widened now (the
            # same GEMM, so the same bits either way); without oneDNN (then nothing is packed), the BLAS
            x32, bias32 = x.float(), None if bias is None else bias.float()
            if onednn_available():
                w32 = weight.float() if packed is None else packed
                return torch.ops.mkldnn._linear_pointwise(x32, w32, bias32, "none", [], "").to(x.dtype)
            return torch.nn.functional.linear(x32, weight.float(), bias32).to(x.dtype)
        if (x.dtype in ONEDNN_DTYPES and x.device.type == "cpu" and weight.dtype == x.dtype
                and (bias is None or bias.dtype == x.dtype) and onednn_available()):
            return torch.ops.mkldnn._linear_pointwise(x, weight if packed is None else packed, bias, "none", [], "")
    return torch.nn.functional.linear(x, weight, bias)


ONEDNN_DTYPES = (torch.float32, torch.bfloat16)
PREPACK_BATCH_HINT = 1024   # the batch size oneDNN picks the packed layout for (any batch takes it)


def prepack(weight: torch.Tensor) -> torch.Tensor | None:
    """oneDNN's blocked copy of a CPU weight, for `linear(..., packed=)` on batches above the kernel's
    row limit (prefill): the same results bit for bit, faster because the GEMM no longer re-blocks
    the weight on every call (2-core EPYC: float32 +5% at 1,024 rows to +55% at 49; bfloat16 +15% to
    +60%). Costs a second copy of the weight. A bfloat16 weight on a CPU without bfloat16 arithmetic
    is packed widened to float32 (twice its bytes): `linear` multiplies its large batches in float32
    anyway, and would otherwise widen the whole weight on every call (2-core AVX2 EPYC, bfloat16
    prefill of SmolLM2-135M: see docs/engine.md). None where oneDNN does not run."""
    from kernels import cpu_kernels

    if weight.device.type != "cpu" or weight.dtype not in ONEDNN_DTYPES or not onednn_available():
        return None
    if weight.dtype == torch.bfloat16 and not cpu_kernels.native_bfloat16():
        weight = weight.float()
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight, PREPACK_BATCH_HINT)
    except Exception:   # the op changed or refuses this weight: the plain weight still works
        return None


def linear_float32_out(x: torch.Tensor, weight: torch.Tensor, impl: str | None = None) -> torch.Tensor:
    """x W^T as float32 (the LM head: logits). Where the CPU kernel multiplies bfloat16 with vdpbf16ps,
    bfloat16 x and W give the kernel's float32 sums unrounded, at any number of rows (each row's sums
    do not depend on the others', so a request's logits are the same whatever it is batched with);
    rounding logits to bfloat16 first would leave ties and flipped near-ties for greedy sampling to
    pick from (a bfloat16 step near a logit of 16 is 0.125). Elsewhere `linear(x, weight).float()`."""
    if x.dtype == torch.bfloat16 and resolve_impl(impl, x) == "cpu":
        from kernels import cpu_kernels

        if cpu_kernels.linear_supports(x[:1], weight, None) and cpu_kernels.linear_native_bfloat16():
            return cpu_kernels.linear_unchecked(x, weight, None, float32_out=True)
    return linear(x, weight, impl=impl).float()


@functools.cache
def onednn_available() -> bool:
    """Whether PyTorch's oneDNN linear op runs here. Float32 batches above the kernel's row limit go
    to it rather than to torch.nn.functional.linear, which calls MKL's sgemm: on an AMD EPYC with
    AVX-512 (2 cores) MKL ran SmolLM2's prefill matmuls at ~200 GFLOP/s and oneDNN at ~450, and on
    the 2-core Xeon the two are level (benchmarks/cpu_linear.py). The op is PyTorch's internal one
    (what torch.compile's CPU backend emits), so it is tried once and left alone if it fails."""
    try:
        x, w, b = torch.ones(2, 3), torch.ones(4, 3), torch.zeros(4)
        return bool(torch.equal(torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], ""), torch.full((2, 4), 3.0)))
    except Exception:   # no oneDNN in this build, or the op changed
        return False

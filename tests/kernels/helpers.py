"""Comparison helpers shared by the kernel tests."""
from __future__ import annotations

import torch

TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 2e-2, torch.float16: 2e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    assert out.shape == ref.shape and out.dtype == ref.dtype, (out.shape, out.dtype, ref.shape, ref.dtype)
    assert torch.isfinite(out).all(), "output has unwritten (NaN) or non-finite elements"
    assert ref.abs().sum() > 0, "degenerate reference"
    err = rel_err(out, ref)
    assert err < TOLERANCE[dtype or ref.dtype], f"relative error {err:.3g}"

"""Triton RMSNorm (with and without the fused residual add) against the PyTorch reference."""
from __future__ import annotations

import pytest
import torch

import kernels
from kernels.rms_norm import rms_norm_torch
from kernels.triton.rms_norm import rms_norm_triton
from tests.kernels.helpers import assert_close


@pytest.mark.parametrize("num_tokens,hidden,dtype", [
    (5, 64, torch.float32),
    (9, 200, torch.bfloat16),   # hidden not a power of 2
    (3, 512, torch.float16),
])
@pytest.mark.parametrize("with_residual", [False, True])
def test_matches_reference(poison, gen, num_tokens, hidden, dtype, with_residual):
    x = torch.randn(num_tokens, hidden, generator=gen).to(dtype)
    weight = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(dtype)
    residual = torch.randn(num_tokens, hidden, generator=gen).to(dtype) if with_residual else None
    inputs = [t.clone() for t in (x, weight) + ((residual,) if with_residual else ())]

    ref = rms_norm_torch(x, weight, 1e-5, residual)
    out = rms_norm_triton(x, weight, 1e-5, residual)

    for before, after in zip(inputs, (x, weight, residual)):
        assert torch.equal(before, after), "an input was modified"
    if with_residual:
        assert_close(out[0], ref[0])
        assert_close(out[1], ref[1])
    else:
        assert_close(out, ref)


def test_strided_rows_and_dispatch(poison, gen):
    # x as a column slice of a wider activation: rows are strided, columns contiguous.
    wide = torch.randn(6, 160, generator=gen)
    x = wide[:, :96]
    residual = torch.randn(6, 96, generator=gen)
    weight = torch.randn(96, generator=gen)
    out, new_residual = kernels.rms_norm(x, weight, 1e-6, residual, impl="triton")
    ref_out, ref_residual = kernels.rms_norm(x, weight, 1e-6, residual)
    assert_close(out, ref_out)
    assert_close(new_residual, ref_residual)

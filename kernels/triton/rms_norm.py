"""Triton RMSNorm, optionally fused with the residual add before it: one program per row."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton import _utils


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, new_res_ptr,
    stride_x, stride_res, stride_out, stride_new_res,
    hidden, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        # The sum is rounded to the residual stream's dtype before the norm reads it, as the
        # reference does (x + residual in that dtype).
        r = tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(new_res_ptr.dtype.element_ty)
        tl.store(new_res_ptr + row * stride_new_res + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / hidden + eps)
    # Llama casts back to the activation dtype before the weight multiply.
    y = (xf * rstd).to(x.dtype).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (w * y).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    # x: [..., hidden] (rows may be strided, the last dim must be contiguous); weight: [hidden]
    shape, hidden = x.shape, x.shape[-1]
    x2 = _rows(x)
    sum_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    out_dtype = torch.promote_types(weight.dtype, sum_dtype)
    num_rows = x2.shape[0]
    out = _utils.empty((num_rows, hidden), out_dtype, x.device)
    res2 = new_res = None
    if residual is not None:
        assert residual.shape == shape, (residual.shape, shape)
        res2 = _rows(residual)
        new_res = _utils.empty((num_rows, hidden), sum_dtype, x.device)
    if num_rows:
        block = _utils.next_pow2(hidden)
        _rms_norm_kernel[(num_rows,)](
            x2, res2 if res2 is not None else x2, weight.contiguous(), out,
            new_res if new_res is not None else out,
            x2.stride(0), res2.stride(0) if res2 is not None else 0, out.stride(0),
            new_res.stride(0) if new_res is not None else 0,
            hidden, eps,
            HAS_RESIDUAL=residual is not None, BLOCK=block,
            num_warps=min(max(block // 256, 1), 16),
        )
    out = out.view(shape)
    return out if residual is None else (out, new_res.view(shape))


def _rows(t: torch.Tensor) -> torch.Tensor:
    """A 2-D [rows, hidden] view with a unit stride on hidden, copying only when it must."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()

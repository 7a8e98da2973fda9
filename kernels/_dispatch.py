"""Pick an implementation for a kernel call: Triton on CUDA tensors, PyTorch elsewhere."""
from __future__ import annotations

import functools

import torch

IMPLS = ("triton", "torch")


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def resolve_impl(impl: str | None, tensor: torch.Tensor) -> str:
    """`impl` forces one implementation; None picks Triton for CUDA tensors when it is installed."""
    if impl is None:
        return "triton" if tensor.is_cuda and triton_available() else "torch"
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "triton" and not triton_available():
        raise RuntimeError("impl='triton' was asked for but the triton package is not installed")
    return impl

"""Pick an implementation for a kernel call: Triton on CUDA tensors, else "cpu" (a compiled C
kernel where the op has one, kernels/cpu_kernels.py; PyTorch for the others); "torch" forces the
PyTorch reference."""
from __future__ import annotations

import functools

import torch

IMPLS = ("triton", "cpu", "torch")


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def resolve_impl(impl: str | None, tensor: torch.Tensor) -> str:
    """`impl` forces one implementation; None picks Triton for CUDA tensors when it is installed,
    else "cpu" (ops without a compiled kernel, or tensors it does not take, run PyTorch)."""
    if impl is None:
        if tensor.is_cuda:
            return "triton" if triton_available() else "torch"
        return "cpu"
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "triton" and not triton_available():
        raise RuntimeError("impl='triton' was asked for but the triton package is not installed")
    return impl

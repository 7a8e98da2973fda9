"""Compute kernels for the engine. Each op has a PyTorch reference (the CPU path) and a Triton
kernel with the same signature; `impl="triton" | "torch"` forces one, else the tensors' device picks."""
from kernels.activation import silu_and_mul
from kernels.kv_cache import store_kv
from kernels.linear import linear, linear_float32_out
from kernels.paged_attention import kernel_rows, paged_attention
from kernels.rms_norm import rms_norm
from kernels.rotary import rotary_embedding

__all__ = ["paged_attention", "kernel_rows", "store_kv", "rms_norm", "rotary_embedding", "silu_and_mul", "linear", "linear_float32_out"]

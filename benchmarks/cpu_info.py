"""What a benchmark prints about the CPU it ran on: model, cores and the flags genq's kernels care
about (results differ by these, so every table says which it came from)."""
from __future__ import annotations

import os
import re
from pathlib import Path


def describe() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    model = re.search(r"model name\s*:\s*(.*)", text)
    flags = sorted(set(re.findall(r"\b(avx512_bf16|amx_bf16|avx512_vnni|avx512f|avx2)\b", text)))
    return f"{model.group(1) if model else '?'}; {os.cpu_count()} cores; flags: {' '.join(flags) or 'none'}"

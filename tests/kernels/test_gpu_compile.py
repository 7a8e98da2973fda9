"""The interpreter runs kernels the GPU compiler would reject; compile one of each kernel path for
sm_90 down to a cubin (no GPU needed: Triton ships ptxas) so CI catches that too."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("gpu_compile.py")


def test_kernels_compile_for_sm90():
    pytest.importorskip("triton.backends.nvidia.compiler", reason="Triton's NVIDIA backend is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    res = subprocess.run([sys.executable, str(SCRIPT), "--quick", "90"], capture_output=True, text=True,
                         env=env, timeout=540)
    assert res.returncode == 0, res.stdout + res.stderr[-4000:]
    assert res.stdout.count("ok ") >= 9, res.stdout

"""Fixtures for the kernel tests: they run the Triton kernels under the interpreter (the suite's
conftest sets TRITON_INTERPRET=1) and compare them with the PyTorch references."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")


@pytest.fixture
def poison(monkeypatch):
    """Every buffer the Triton wrappers allocate (outputs and split partials) starts as NaN, so an
    element a kernel forgets to write, or a partial it reads before writing, shows up."""
    from kernels.triton import _utils

    def empty_nan(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(_utils, "empty", empty_nan)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)

"""One engine per GPU when workers are scaled out: each worker locks a free GPU's file, the kernel
frees it when the worker dies, and a worker with no GPU left refuses to start."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from app.infra.settings import Settings
from worker.devices import claim_gpus, release_gpus, select_device

GPUS = ["GPU-aaaa", "GPU-bbbb"]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _release():
    yield
    release_gpus()


def test_claims_take_free_gpus_in_order_then_refuse(tmp_path):
    assert claim_gpus(tmp_path, GPUS) == 0
    assert claim_gpus(tmp_path, GPUS) == 1       # a second open file description: locked out like another worker
    with pytest.raises(RuntimeError, match="no 1 free GPU"):
        claim_gpus(tmp_path, GPUS)
    release_gpus()
    assert claim_gpus(tmp_path, GPUS) == 0


def test_tensor_parallel_workers_claim_aligned_groups(tmp_path):
    gpus = [f"GPU-{i}" for i in range(5)]
    assert claim_gpus(tmp_path, gpus[:1]) == 0    # a single-GPU worker (same lock dir) holds GPU 0
    assert claim_gpus(tmp_path, gpus, 2) == 2     # group 0-1 is not free: 2-3; GPU 4 alone is no group
    with pytest.raises(RuntimeError, match="at most 2 worker"):
        claim_gpus(tmp_path, gpus, 2)
    assert claim_gpus(tmp_path, gpus) == 1        # the group that failed left GPU 1 unlocked


def test_a_dead_workers_gpu_is_free_again(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from pathlib import Path
            from worker.devices import claim_gpus
            print(claim_gpus(Path({str(tmp_path)!r}), {GPUS!r}), flush=True)
            time.sleep(60)
        """)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "0"
        assert (tmp_path / "GPU-aaaa.lock").read_text().split()[-1] == str(holder.pid)
        assert claim_gpus(tmp_path, GPUS) == 1
        release_gpus()
    finally:
        holder.kill()
        holder.wait()
    assert claim_gpus(tmp_path, GPUS) == 0       # killed, not shut down: the lock went with the process


def test_explicit_devices_skip_the_locks(tmp_path):
    assert select_device(Settings(home=str(tmp_path), device="cpu")) == "cpu"
    assert select_device(Settings(home=str(tmp_path), device="cuda:3")) == "cuda:3"
    assert not (tmp_path / "gpu-locks").exists()


def test_auto_claims_a_gpu_when_there_is_one(tmp_path):
    import torch

    settings = Settings(home=str(tmp_path), device="auto")
    if not torch.cuda.is_available():
        assert select_device(settings) == "cpu"
        return
    count = torch.cuda.device_count()
    claimed = [select_device(settings) for _ in range(count)]
    assert claimed == [f"cuda:{i}" for i in range(count)]
    assert len(list((tmp_path / "gpu-locks").glob("GPU-*.lock"))) == count
    with pytest.raises(RuntimeError, match="other genq workers hold them"):
        select_device(settings)

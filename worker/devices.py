"""Which device a worker's engine runs on: one engine per GPU, even when workers are scaled out.

`docker compose up --scale worker=N` gives every replica the same GPU reservation (Compose has no
per-replica device ids), so the workers sort it out themselves: with GENQ_DEVICE `auto` or
`cuda`, each takes exclusive locks on the lock files of the first free GPUs under
`<GENQ_HOME>/gpu-locks` (a volume the workers of one host share) and holds them for its lifetime;
the kernel releases them when the process dies, however it dies. A tensor-parallel engine spans
GENQ_TENSOR_PARALLEL_SIZE consecutive GPUs from its device, so a worker claims an aligned group of
that many. An explicit `cuda:N` skips the locks (deliberate sharing).
"""
from __future__ import annotations

import fcntl
import logging
import os
import socket
from pathlib import Path

from app.infra.settings import Settings

log = logging.getLogger(__name__)

_held: list[int] = []   # lock file descriptors this process keeps open (closing one frees its GPU)


def select_device(settings: Settings) -> str:
    if settings.device not in ("auto", "cuda"):
        return settings.device
    import torch

    if not torch.cuda.is_available():
        if settings.device == "cuda":
            raise RuntimeError("GENQ_DEVICE=cuda but torch sees no CUDA device")
        return "cpu"
    gpus = [_gpu_key(torch, i) for i in range(torch.cuda.device_count())]
    size = settings.tensor_parallel_size
    index = claim_gpus(Path(settings.home) / "gpu-locks", gpus, size)
    log.info("worker engine on cuda:%d..%d (%s)", index, index + size - 1, ", ".join(gpus[index:index + size]))
    return f"cuda:{index}"


def _gpu_key(torch, index: int) -> str:
    # The UUID names the physical GPU whatever CUDA_VISIBLE_DEVICES renumbers; the index is the fallback.
    uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    return f"GPU-{uuid}" if uuid else f"index-{index}"


def claim_gpus(lock_dir: Path, gpus: list[str], count: int = 1) -> int:
    """Lock the first group of `count` consecutive GPUs (groups start at multiples of `count`) that
    no other live process holds; the position of its first GPU in `gpus`."""
    lock_dir.mkdir(parents=True, exist_ok=True)
    for start in range(0, len(gpus) - count + 1, count):
        fds = []
        for key in gpus[start:start + count]:
            fd = _try_lock(lock_dir / f"{key}.lock")
            if fd is None:
                break
            fds.append(fd)
        if len(fds) == count:
            _held.extend(fds)
            return start
        for fd in fds:
            os.close(fd)
    raise RuntimeError(
        f"no {count} free GPU(s) among the {len(gpus)} of this host: other genq workers hold them (locks in "
        f"{lock_dir}); run at most {len(gpus) // count} worker(s) here, or set GENQ_DEVICE=cuda:N to share on purpose")


def _try_lock(path: Path) -> int | None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.write(fd, f"{socket.gethostname()} pid {os.getpid()}\n".encode())
    return fd


def release_gpus() -> None:
    while _held:
        os.close(_held.pop())

"""The main loop of ranks 1..N-1: load this rank's shard, then run whatever step rank 0 sends.

Commands arrive over a pipe from rank 0 (the engine's process) and are answered over it; tensors
move through torch.distributed. A rank idles in `recv` on the pipe, never inside a collective, so
an idle engine does not trip the collectives' timeout; and when rank 0's process dies the pipe
closes and the rank exits instead of waiting forever.
"""
from __future__ import annotations

import datetime
import os
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist


@dataclass(frozen=True, slots=True)
class RankSpec:
    """What a rank process needs to build its shard; picklable for the spawn context."""
    rank: int
    world_size: int
    init_method: str
    backend: str
    timeout_s: float
    hf_dir: str
    dtype: torch.dtype
    device: str
    max_positions: int
    block_size: int
    kernel_impl: str | None
    num_threads: int
    kernel_cache_dir: str    # the engine's cache_dir/kernels: a spawned process starts with the default


def init_group(spec: RankSpec) -> None:
    dist.init_process_group(spec.backend, init_method=spec.init_method, rank=spec.rank,
                            world_size=spec.world_size, timeout=datetime.timedelta(seconds=spec.timeout_s))


def rank_main(spec: RankSpec, conn) -> None:
    from kernels import cpu_kernels
    from worker.engine.loader import load_model
    from worker.engine.parallel.runner import ParallelModelRunner
    from worker.engine.parallel.sharding import Sharder
    from worker.engine.parallel.step_inputs import StepInputs

    torch.set_num_threads(spec.num_threads)
    cpu_kernels.set_cache_dir(spec.kernel_cache_dir)
    device = torch.device(spec.device)
    try:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        model, _ = load_model(Path(spec.hf_dir), spec.dtype, device, spec.max_positions,
                              apply_sharding=Sharder(spec.rank, spec.world_size))
        conn.send(("loaded", None))
        init_group(spec)   # rank 0 joins once every rank (itself included) has loaded
        _, num_blocks = _expect(conn, "kv")
        runner = ParallelModelRunner(model, num_blocks, spec.block_size, spec.dtype, device, spec.kernel_impl)
        conn.send(("ready", None))
        while True:
            kind, arg = conn.recv()
            if kind == "step":
                runner.execute(StepInputs.receive(arg, device))
            elif kind == "stats":
                conn.send(("stats", runner.rank_stats()))
            elif kind == "stop":
                break
            else:
                raise RuntimeError(f"unknown command {kind!r}")
    except (EOFError, BrokenPipeError):
        os._exit(3)   # rank 0 is gone; nothing is left to clean up for
    except BaseException:
        try:
            conn.send(("error", f"rank {spec.rank} (pid {os.getpid()}): {traceback.format_exc()}"))
        except Exception:
            pass
        os._exit(1)
    dist.destroy_process_group()
    os._exit(0)   # skip the interpreter's teardown: nothing in this process needs it


def _expect(conn, kind: str):
    message = conn.recv()
    if message[0] != kind:
        raise RuntimeError(f"expected {kind!r} from rank 0, got {message[0]!r}")
    return message

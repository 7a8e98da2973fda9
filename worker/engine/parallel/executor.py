"""Rank 0's side of tensor parallelism: starts ranks 1..N-1, sends them each step, watches them.

Rank 0 is the engine's own process: it hosts the scheduler and the sampler and holds shard 0.
Every failure of a rank (its process exits, it reports an error, a collective errors or outlasts
the timeout) fails the whole engine with TensorParallelError: the ranks run in lockstep, so one
lost rank leaves the others unable to run a step.
"""
from __future__ import annotations

import datetime
import gc
import logging
import socket
import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.connection import wait as wait_ready
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from worker.engine.config import EngineConfig
from worker.engine.parallel.rank import RankSpec, rank_main
from worker.engine.parallel.runner import ParallelModelRunner
from worker.engine.parallel.sharding import Sharder, check_shardable
from worker.engine.parallel.step_inputs import StepInputs

log = logging.getLogger(__name__)

LOAD_TIMEOUT_S = 1800.0      # longest wait for a rank to start and load its shard


class TensorParallelError(RuntimeError):
    """A rank of a tensor-parallel engine died, failed or hung: the engine cannot run another step."""


@dataclass(slots=True)
class _Rank:
    rank: int
    process: mp.Process
    conn: object    # the parent's end of the rank's pipe


class TensorParallelExecutor:
    def __init__(self, config: EngineConfig, hf_dir: Path, max_positions: int):
        """Starts ranks 1..N-1, which load their shards while rank 0 loads its own (with
        `self.sharder` as the loader's sharding hook); `make_runner` then joins them up."""
        from transformers import AutoConfig

        from worker.engine.loader import cache_root, llama_args

        self.world_size = config.tensor_parallel_size
        self.device = torch.device(config.device)
        self.timeout_s = config.tp_timeout_seconds   # longest wait for a collective or a rank's answer
        self.sharder = Sharder(0, self.world_size)
        self.error: str | None = None
        self.runner: ParallelModelRunner | None = None
        self._ranks: list[_Rank] = []
        check_shardable(llama_args(AutoConfig.from_pretrained(hf_dir)), self.world_size)
        backend = self._check_devices()
        if dist.is_initialized():
            gc.collect()   # an engine that is gone but not yet collected still holds the group
        if dist.is_initialized():
            raise RuntimeError("this process already has a torch.distributed process group: "
                               "one tensor-parallel engine per process")
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        ctx = mp.get_context("spawn")
        for rank in range(1, self.world_size):
            parent, child = ctx.Pipe()
            spec = RankSpec(rank=rank, world_size=self.world_size, init_method=init_method, backend=backend,
                            timeout_s=self.timeout_s, hf_dir=str(hf_dir), dtype=_TORCH_DTYPES[config.dtype],
                            device=str(self._rank_device(rank)), max_positions=max_positions,
                            block_size=config.block_size, kernel_impl=config.kernel_impl,
                            num_threads=torch.get_num_threads(),
                            kernel_cache_dir=str(cache_root(config.cache_dir) / "kernels"))
            process = ctx.Process(target=rank_main, args=(spec, child), name=f"genq-tp-rank{rank}", daemon=True)
            process.start()
            child.close()
            self._ranks.append(_Rank(rank, process, parent))
        self._finalizer = weakref.finalize(self, _teardown, list(self._ranks))
        self._backend, self._init_method = backend, init_method

    def _check_devices(self) -> str:
        if self.device.type != "cuda":
            return "gloo"
        last = (self.device.index or 0) + self.world_size
        if last > torch.cuda.device_count():
            raise ValueError(f"tensor_parallel_size={self.world_size} from {self.device} needs {last} GPUs; "
                             f"this machine has {torch.cuda.device_count()}")
        torch.cuda.set_device(self._rank_device(0))
        return "nccl"

    def _rank_device(self, rank: int) -> torch.device:
        if self.device.type != "cuda":
            return self.device
        return torch.device("cuda", (self.device.index or 0) + rank)

    # -- start-up -------------------------------------------------------------------------------

    def make_runner(self, model, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device,
                    kernel_impl: str | None = None) -> ParallelModelRunner:
        """Rank 0's runner, once every rank has loaded its shard and allocated its KV cache of
        `num_blocks` blocks (the same block ids address the same tokens on every rank)."""
        try:
            for r in self._ranks:
                self._expect(r, "loaded", LOAD_TIMEOUT_S)   # a rank that fails to load says so here
            dist.init_process_group(self._backend, init_method=self._init_method, rank=0,
                                    world_size=self.world_size, timeout=datetime.timedelta(seconds=self.timeout_s))
            for r in self._ranks:
                r.conn.send(("kv", num_blocks))
            self.runner = ParallelModelRunner(model, num_blocks, block_size, dtype, device, kernel_impl, executor=self)
            for r in self._ranks:
                self._expect(r, "ready", self.timeout_s)
        except BaseException as exc:
            raise self._fail(f"starting the ranks failed: {exc}") from exc
        return self.runner

    # -- each step ------------------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        return self.error is None

    @contextmanager
    def step_guard(self):
        """Around everything rank 0 does for one step. Any exception inside is fatal: the ranks
        may be out of step with each other after it."""
        if self.error is not None:
            raise TensorParallelError(f"the tensor-parallel engine is down: {self.error}")
        dead = self._dead_ranks()
        if dead:
            raise self._fail(dead)
        try:
            yield
        except Exception as exc:
            raise self._fail(f"a step failed: {type(exc).__name__}: {exc}") from exc
        except BaseException:
            self._fail("a step was interrupted")
            raise

    def send_step(self, step: StepInputs) -> None:
        header, payload = step.pack()
        for r in self._ranks:
            r.conn.send(("step", header))
        if payload.numel():
            dist.broadcast(payload, src=0)

    def wait_device(self) -> None:
        """On CUDA, wait for the step's kernels while watching the ranks: a collective whose peer
        died never completes, and a plain synchronize would wait for it forever."""
        if self.device.type != "cuda":
            return
        event = torch.cuda.Event()
        event.record()
        deadline = time.monotonic() + self.timeout_s
        while not event.query():
            dead = self._dead_ranks()
            if dead:
                raise RuntimeError(dead)
            if time.monotonic() > deadline:
                raise TimeoutError(f"the step did not finish within {self.timeout_s:.0f}s")
            time.sleep(0.0002)

    def rank_stats(self) -> list[dict]:
        """Each rank's own report of its shard (parameters, KV cache), asked of the rank now.
        Call it from the thread that steps the engine."""
        with self.step_guard():
            for r in self._ranks:
                r.conn.send(("stats", None))
            return [self.runner.rank_stats()] + [self._expect(r, "stats", self.timeout_s) for r in self._ranks]

    def stats(self) -> dict:
        """Cheap (a non-blocking wait per rank): an idle engine's stats notice a dead rank too."""
        if self.error is None:
            dead = self._dead_ranks()
            if dead:
                self._fail(dead)
        return {"tensor_parallel_size": self.world_size, "healthy": self.healthy, "tensor_parallel_error": self.error}

    # -- failure and shutdown -------------------------------------------------------------------

    def _dead_ranks(self) -> str | None:
        for r in self._ranks:
            if not r.process.is_alive():
                return f"rank {r.rank} (pid {r.process.pid}) exited with code {r.process.exitcode}"
        return None

    def _expect(self, r: _Rank, kind: str, timeout: float):
        """The payload of rank r's next message, which must be `kind`."""
        ready = wait_ready([r.conn, r.process.sentinel], timeout)
        if r.conn in ready:
            try:
                message = r.conn.recv()
            except EOFError:
                message = None
            if message is not None and message[0] == kind:
                return message[1]
            if message is not None and message[0] == "error":
                raise RuntimeError(message[1])
            if message is not None:
                raise RuntimeError(f"rank {r.rank} answered {message[0]!r}, expected {kind!r}")
            r.process.join(1.0)
        if not r.process.is_alive():
            raise RuntimeError(f"rank {r.rank} (pid {r.process.pid}) exited with code {r.process.exitcode}")
        raise TimeoutError(f"rank {r.rank} did not answer within {timeout:.0f}s")

    def _fail(self, reason: str) -> TensorParallelError:
        """Mark the engine down, stop every rank, and return the error to raise."""
        if self.error is None:
            self.error = "; ".join(dict.fromkeys(self._rank_reports() + [reason]))
            log.error("tensor-parallel engine down: %s", self.error)
            for r in self._ranks:
                if r.process.is_alive():
                    r.process.kill()   # it may sit in a collective that will never complete
            self._finalizer()
        return TensorParallelError(self.error)

    def _rank_reports(self) -> list[str]:
        # A rank that failed on its own says why over its pipe; a killed one has only an exit code,
        # which may lag the collective error that brought us here by a moment.
        deadline = time.monotonic() + 0.5
        notes = []
        for r in self._ranks:
            r.process.join(max(0.0, deadline - time.monotonic()))   # reap a rank that is dying
            try:
                while r.conn.poll(0):
                    kind, arg = r.conn.recv()
                    if kind == "error":
                        notes.append(str(arg).rstrip())
            except (EOFError, OSError):
                pass
            if r.process.exitcode is not None:
                notes.append(f"rank {r.rank} (pid {r.process.pid}) exited with code {r.process.exitcode}")
        return notes

    def shutdown(self) -> None:
        """Stop ranks 1..N-1 and leave the process group. Idempotent."""
        if self.error is None:
            self.error = "shut down"
        self._finalizer()


def _teardown(ranks: list[_Rank]) -> None:
    for r in ranks:
        try:
            r.conn.send(("stop", None))
        except (OSError, ValueError):
            pass
    deadline = time.monotonic() + 5.0
    for r in ranks:
        r.process.join(max(0.0, deadline - time.monotonic()))
        if r.process.is_alive():
            r.process.kill()
            r.process.join(5.0)
        r.conn.close()
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:
            log.exception("leaving the tensor-parallel process group failed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

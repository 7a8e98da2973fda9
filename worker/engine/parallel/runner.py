"""ModelRunner for one rank of a tensor-parallel model: the same cache and inputs, its own shard.

Rank 0 prepares the step as ModelRunner does, sends it to the other ranks and runs it; every rank
runs `execute`, in lockstep, since the sharded layers' collectives pair them up.
"""
from __future__ import annotations

import os

import torch

from worker.engine.model_runner import ModelRunner
from worker.engine.parallel.layers import gather_vocab
from worker.engine.parallel.step_inputs import StepInputs
from worker.engine.scheduler import SchedulerOutput


class ParallelModelRunner(ModelRunner):
    def __init__(self, model, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device,
                 kernel_impl: str | None = None, executor=None):
        super().__init__(model, num_blocks, block_size, dtype, device, kernel_impl)
        self.plan = model.shard_plan
        self.executor = executor   # rank 0 only: sends each step to the other ranks, watches them

    @torch.inference_mode()
    def run(self, batch: SchedulerOutput) -> tuple[torch.Tensor, list[int]]:
        with self.executor.step_guard():
            input_ids, positions, meta, starts = self.prepare(batch)
            rows = sorted({row for _, row in batch.samples})
            step = StepInputs(
                input_ids, positions, meta,
                logit_rows=torch.tensor([starts[row + 1] - 1 for row in rows], dtype=torch.int64, device=self.device),
                block_copies=torch.tensor(batch.block_copies, dtype=torch.int64, device=self.device).reshape(-1, 2))
            self.executor.send_step(step)
            logits = self.execute(step)
            self.executor.wait_device()
        where = {row: i for i, row in enumerate(rows)}
        return logits, [where[row] for _, row in batch.samples]

    @torch.inference_mode()
    def execute(self, step: StepInputs) -> torch.Tensor:
        """Every rank: the forward over this rank's shard. Returns the whole vocabulary's logits
        [num_rows, vocab] (float32) of the rows `step.logit_rows` names (all-gathered, so every
        rank holds them; only rank 0 samples)."""
        if step.block_copies.numel():
            self.copy_blocks(step.block_copies.tolist())
        hidden = self.model(step.input_ids, step.positions, self.kv_caches, step.meta)
        if not step.logit_rows.numel():
            return hidden.new_empty((0, 0)).float()
        local = self.model.compute_logits(hidden.index_select(0, step.logit_rows), impl=self.kernel_impl)
        return gather_vocab(local, self.plan.full.vocab_size, self.plan.world_size)

    def rank_stats(self) -> dict:
        params = list(self.model.parameters())
        plan = self.plan
        return {"rank": plan.rank, "pid": os.getpid(), "device": str(self.device),
                "param_count": sum(p.numel() for p in params),
                "param_bytes": sum(p.numel() * p.element_size() for p in params),
                "kv_cache_bytes": sum(t.numel() * t.element_size() for kv in self.kv_caches for t in kv),
                "num_heads": plan.num_heads, "num_kv_heads": plan.num_kv_heads,
                "kv_head_start": plan.kv_head_start, "intermediate_size": plan.intermediate_size,
                "vocab_shard": plan.vocab_shard}

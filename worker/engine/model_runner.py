"""Turns a scheduled batch into model inputs, runs the model, returns the logits to sample from."""
from __future__ import annotations

import torch

from worker.engine.host_memory import huge_page_tensors
from worker.engine.models.llama import AttentionMetadata
from worker.engine.scheduler import SchedulerOutput


class ModelRunner:
    def __init__(self, model, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device,
                 kernel_impl: str | None = None):
        self.model = model
        self.block_size = block_size
        self.device = device
        self.kernel_impl = kernel_impl
        args = model.args
        shape = (num_blocks, block_size, args.num_key_value_heads, args.head_dim)
        # One (k, v) pair per layer: [num_blocks, block_size, num_kv_heads, head_dim]. Zeroed, not
        # empty: batched attention reads padding slots past a sequence's end and weights them 0,
        # and 0 * NaN from uninitialised memory would still be NaN. On the CPU in memory the kernel
        # may back with 2 MB pages (host_memory.huge_page_tensors: a decode step reads every running
        # sequence's K and V in scattered block-sized runs), faulted in now by the zeroing.
        n = 2 * args.num_hidden_layers
        tensors = huge_page_tensors([(shape, dtype)] * n) if device.type == "cpu" else None
        if tensors is None:
            tensors = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n)]
        else:
            for t in tensors:
                t.zero_()
        self.kv_caches = list(zip(tensors[0::2], tensors[1::2]))

    def one_call_tokens(self) -> int | None:
        """The most tokens a step may hold and still run as one compiled call (None: no such call)."""
        return self.model.one_call_tokens(self.kv_caches, self.kernel_impl)

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        src = torch.tensor([s for s, _ in copies], device=self.device)
        dst = torch.tensor([d for _, d in copies], device=self.device)
        for k_cache, v_cache in self.kv_caches:
            k_cache[dst] = k_cache[src]
            v_cache[dst] = v_cache[src]

    def prepare(self, batch: SchedulerOutput):
        bs = self.block_size
        ids, positions, slots, starts, seq_lens, tables = [], [], [], [0], [], []
        for item in batch.scheduled:
            seq = item.seq
            a, b = seq.num_computed_tokens, seq.num_computed_tokens + item.num_new_tokens
            block_ids = [blk.block_id for blk in seq.blocks]
            ids.extend(seq.token_ids[a:b])
            positions.extend(range(a, b))
            slots.extend(block_ids[p // bs] * bs + p % bs for p in range(a, b))
            starts.append(starts[-1] + b - a)
            seq_lens.append(b)
            tables.append(block_ids)
        width = max(len(t) for t in tables)
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=dev),
            kernel_impl=self.kernel_impl,
        )
        return (torch.tensor(ids, dtype=torch.int64, device=dev),
                torch.tensor(positions, dtype=torch.int64, device=dev), meta, starts)

    @torch.inference_mode()
    def run(self, batch: SchedulerOutput) -> tuple[torch.Tensor, list[int]]:
        """Returns logits [num_rows, vocab] (float32) for the distinct rows that `batch.samples`
        refer to, and for each sample its row in those logits."""
        if batch.block_copies:
            self.copy_blocks(batch.block_copies)
        input_ids, positions, meta, starts = self.prepare(batch)
        hidden = self.model(input_ids, positions, self.kv_caches, meta)
        rows = sorted({row for _, row in batch.samples})
        if not rows:
            return hidden.new_empty((0, 0)).float(), []
        where = {row: i for i, row in enumerate(rows)}
        last = torch.tensor([starts[row + 1] - 1 for row in rows], device=self.device)
        logits = self.model.compute_logits(hidden.index_select(0, last), impl=self.kernel_impl)
        return logits, [where[row] for _, row in batch.samples]

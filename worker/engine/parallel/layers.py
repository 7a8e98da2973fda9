"""The layers tensor parallelism swaps into the model at load time.

Column-parallel projections need no layer of their own: each rank holds the model's own `Linear` with
its slice of the output features, and its output stays local. Row-parallel projections and the
vocabulary-parallel embedding produce partial sums that every rank needs in full, so they
all-reduce; the vocabulary-parallel LM head's logits are all-gathered by the runner.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

import kernels
from worker.engine.models.llama import Linear


class RowParallelLinear(Linear):
    """Holds the columns of `weight` (input features) that match this rank's slice of its input;
    the partial products of all ranks are summed. The bias, replicated, is added once after the sum."""

    def forward(self, x: torch.Tensor, impl: str | None = None) -> torch.Tensor:
        out = kernels.linear(x, self.weight, impl=impl)
        dist.all_reduce(out)
        return out if self.bias is None else out + self.bias


class VocabParallelEmbedding(nn.Module):
    """Rows [start, start + num_local) of the (padded) embedding table. A token outside the slice
    embeds as zeros here; the all-reduce fills in the rank that owns it."""

    def __init__(self, num_local: int, embedding_dim: int, start: int):
        super().__init__()
        self.start = start
        self.num_local = num_local
        self.weight = nn.Parameter(torch.empty(num_local, embedding_dim))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        local = input_ids - self.start
        outside = (local < 0) | (local >= self.num_local)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)   # [num_tokens, hidden]
        out.masked_fill_(outside[:, None], 0)
        dist.all_reduce(out)
        return out


def gather_vocab(local_logits: torch.Tensor, vocab_size: int, world_size: int) -> torch.Tensor:
    """[rows, vocab_shard] on every rank -> [rows, vocab_size], the padding rows of the last
    shard dropped."""
    parts = [torch.empty_like(local_logits) for _ in range(world_size)]
    dist.all_gather(parts, local_logits.contiguous())
    return torch.cat(parts, dim=-1)[:, :vocab_size]

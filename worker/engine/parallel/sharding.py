"""Which slice of every layer a rank holds, and the load-time swap that gives it to the model.

`Sharder(rank, world_size)` is the `apply_sharding(model, state_dict)` hook of
`loader.load_model`: it runs on the meta-device model before any weight is materialised, swaps in
per-rank layers (column-parallel qkv and gate|up, row-parallel o and down, vocabulary-parallel
embedding and LM head), and returns the state dict cut to this rank, so no rank's parameters ever
hold the whole model.

Heads are dealt out with their KV heads: when there are at least as many KV heads as ranks, each
rank gets whole KV groups (a KV head and the query heads that attend to it); with fewer, the
ranks of one group each keep a copy of its KV head and split its query heads. Counts that do
not divide evenly give the lower ranks one more (a 9-head, 3-KV-head model on 2 ranks: 6 + 3
query heads); the lockstep then runs at the pace of the largest shard.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from worker.engine.models.llama import Linear, LlamaArgs
from worker.engine.parallel.layers import RowParallelLinear, VocabParallelEmbedding


@dataclass(frozen=True, slots=True)
class ShardPlan:
    rank: int
    world_size: int
    full: LlamaArgs                 # the whole model's shape
    head_start: int                 # this rank's first query head in the whole model
    num_heads: int                  # query heads on this rank
    kv_head_start: int              # this rank's first KV head in the whole model
    num_kv_heads: int               # KV heads on this rank (1, a replica, when fewer KV heads than ranks)
    intermediate_start: int
    intermediate_size: int          # this rank's slice of the MLP width
    vocab_shard: int                # embedding / LM-head rows per rank (the vocabulary padded to world_size)

    @classmethod
    def for_rank(cls, args: LlamaArgs, rank: int, world_size: int) -> "ShardPlan":
        check_shardable(args, world_size)
        heads, kv_heads = args.num_attention_heads, args.num_key_value_heads
        group = heads // kv_heads                    # query heads per KV head
        if kv_heads >= world_size:
            kv_start, num_kv = _split(kv_heads, world_size, rank)
            head_start, num_heads = kv_start * group, num_kv * group
        else:
            ranks_per_kv = world_size // kv_heads
            kv_start, num_kv = rank // ranks_per_kv, 1
            offset, num_heads = _split(group, ranks_per_kv, rank % ranks_per_kv)
            head_start = kv_start * group + offset
        inter_start, inter_size = _split(args.intermediate_size, world_size, rank)
        return cls(rank=rank, world_size=world_size, full=args, head_start=head_start, num_heads=num_heads,
                   kv_head_start=kv_start, num_kv_heads=num_kv, intermediate_start=inter_start,
                   intermediate_size=inter_size, vocab_shard=-(-args.vocab_size // world_size))

    @property
    def vocab_start(self) -> int:
        return self.rank * self.vocab_shard

    def rank_args(self) -> LlamaArgs:
        """The model's args as this rank sees them: its own head counts and MLP width (what its
        layers and KV cache are sized by). vocab_size stays the whole vocabulary: it is what the
        engine validates token ids against and what the gathered logits span."""
        return replace(self.full, num_attention_heads=self.num_heads, num_key_value_heads=self.num_kv_heads,
                       intermediate_size=self.intermediate_size)


def _split(total: int, parts: int, index: int) -> tuple[int, int]:
    """(start, size) of part `index` of `total` items dealt into `parts` parts, the lower parts
    one larger when it does not divide (rank 0, which sizes the KV cache, holds the most)."""
    base, extra = divmod(total, parts)
    return index * base + min(index, extra), base + (index < extra)


def check_shardable(args: LlamaArgs, world_size: int) -> None:
    heads, kv_heads = args.num_attention_heads, args.num_key_value_heads
    problems = []
    if kv_heads < world_size and world_size % kv_heads:
        problems.append(f"{kv_heads} KV heads do not divide among {world_size} ranks "
                        "(with fewer KV heads than ranks, the size must be a multiple of them)")
    elif kv_heads < world_size and heads // kv_heads < world_size // kv_heads:
        problems.append(f"{heads} attention heads leave a rank without one")
    if args.intermediate_size < world_size:
        problems.append(f"an intermediate size of {args.intermediate_size}")
    if problems:
        raise ValueError(f"tensor_parallel_size={world_size} cannot shard this model: " + "; ".join(problems))


class Sharder:
    """`apply_sharding` for `loader.load_model`: swaps the layers of a meta-device model and cuts
    its state dict for one rank."""

    def __init__(self, rank: int, world_size: int):
        self.rank = rank
        self.world_size = world_size
        self.whole_param_count: int | None = None   # the unsharded model's, once it has run

    def __call__(self, model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.whole_param_count = sum(t.numel() for t in state.values())
        plan = ShardPlan.for_rank(model.args, self.rank, self.world_size)
        shard_modules(model, plan)
        return shard_state(state, plan)


def shard_modules(model: nn.Module, plan: ShardPlan) -> None:
    args = plan.full
    hidden, head_dim = args.hidden_size, args.head_dim
    with torch.device("meta"):
        for layer in model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            attn.num_heads, attn.num_kv_heads = plan.num_heads, plan.num_kv_heads
            attn.q_size, attn.kv_size = plan.num_heads * head_dim, plan.num_kv_heads * head_dim
            attn.qkv_proj = Linear(hidden, attn.q_size + 2 * attn.kv_size, bias=attn.qkv_proj.bias is not None)
            attn.o_proj = RowParallelLinear(attn.q_size, hidden, bias=attn.o_proj.bias is not None)
            mlp.intermediate_size = plan.intermediate_size
            mlp.gate_up_proj = Linear(hidden, 2 * plan.intermediate_size, bias=mlp.gate_up_proj.bias is not None)
            mlp.down_proj = RowParallelLinear(plan.intermediate_size, hidden, bias=mlp.down_proj.bias is not None)
        model.embed_tokens = VocabParallelEmbedding(plan.vocab_shard, hidden, plan.vocab_start)
        if model.lm_head is not None:
            model.lm_head = Linear(hidden, plan.vocab_shard, bias=False)
    model.args = plan.rank_args()
    model.shard_plan = plan


def shard_state(state: dict[str, torch.Tensor], plan: ShardPlan) -> dict[str, torch.Tensor]:
    """The whole model's (fused) state dict -> this rank's. Unlisted tensors (norms, row-parallel
    biases) are replicated."""
    out = {}
    for name, tensor in state.items():
        if name.endswith("self_attn.qkv_proj.weight") or name.endswith("self_attn.qkv_proj.bias"):
            out[name] = _qkv_rows(tensor, plan)
        elif name.endswith("self_attn.o_proj.weight"):
            out[name] = _slice(tensor, 1, plan.head_start * plan.full.head_dim, plan.num_heads * plan.full.head_dim)
        elif name.endswith("mlp.gate_up_proj.weight") or name.endswith("mlp.gate_up_proj.bias"):
            gate, up = tensor.split(plan.full.intermediate_size)
            start, size = plan.intermediate_start, plan.intermediate_size
            out[name] = torch.cat([_slice(gate, 0, start, size), _slice(up, 0, start, size)])
        elif name.endswith("mlp.down_proj.weight"):
            out[name] = _slice(tensor, 1, plan.intermediate_start, plan.intermediate_size)
        elif name in ("embed_tokens.weight", "lm_head.weight"):
            out[name] = _vocab_rows(tensor, plan)
        else:
            out[name] = tensor
    return out


def _slice(tensor: torch.Tensor, dim: int, start: int, size: int) -> torch.Tensor:
    # A copy, not a view: a view would keep the whole checkpoint tensor alive.
    return tensor.narrow(dim, start, size).clone()


def _qkv_rows(tensor: torch.Tensor, plan: ShardPlan) -> torch.Tensor:
    # q|k|v are fused along dim 0: cut each part to this rank's heads, then fuse again.
    d = plan.full.head_dim
    q, k, v = tensor.split([plan.full.num_attention_heads * d, plan.full.num_key_value_heads * d,
                            plan.full.num_key_value_heads * d])
    kv_start, kv_size = plan.kv_head_start * d, plan.num_kv_heads * d
    return torch.cat([_slice(q, 0, plan.head_start * d, plan.num_heads * d),
                      _slice(k, 0, kv_start, kv_size), _slice(v, 0, kv_start, kv_size)])


def _vocab_rows(tensor: torch.Tensor, plan: ShardPlan) -> torch.Tensor:
    # The last shard is padded with zero rows: their logits are cut off after the gather, and no
    # token id reaches their embeddings.
    start = min(plan.vocab_start, tensor.shape[0])
    rows = tensor.narrow(0, start, min(plan.vocab_shard, tensor.shape[0] - start))
    if rows.shape[0] == plan.vocab_shard:
        return rows.clone()
    return torch.cat([rows, rows.new_zeros(plan.vocab_shard - rows.shape[0], *tensor.shape[1:])])

"""The Llama family (Llama, Mistral, Qwen2, SmolLM2) over a paged KV cache.

The model knows nothing of serving: it takes flat tokens, their positions and the attention
metadata of one step, and calls the `kernels` ops. Projections are fused (q|k|v and gate|up) so a
layer runs four matmuls.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

import kernels


@dataclass(slots=True)
class LlamaArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool = False   # Qwen2 has q/k/v biases
    mlp_bias: bool = False


class Linear(nn.Linear):
    """nn.Linear through `kernels.linear` (on the CPU, a compiled kernel for decode-sized batches,
    where the BLAS is slow; oneDNN with the weight's packed copy, when `prepack_cpu_weights` made one,
    for larger ones; in bfloat16 on AMX, the kernel's tiles on the `tiles` copy up to ~1,000 rows)."""

    packed_weight: torch.Tensor | None = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # a buffer (not saved), so that move_to_huge_pages moves it with the weights
        self.register_buffer("tiles", None, persistent=False)

    def forward(self, x: torch.Tensor, impl: str | None = None) -> torch.Tensor:
        return kernels.linear(x, self.weight, self.bias, impl=impl, packed=self.packed_weight, tiles=self.tiles)


# Each packing adds a copy of the projections: above this many bytes of copies, the model stays unpacked.
PREPACK_MAX_BYTES = 4 << 30


def prepack_cpu_weights(model: nn.Module) -> int:
    """Give every projection of a CPU model its oneDNN-packed copy (kernels.linear.prepack) and, for
    bfloat16 on a CPU that multiplies bfloat16 natively (AMX tiles or AVX512-BF16), its tile-packed one
    (cpu_kernels.pack_tiles), when the copies total at most PREPACK_MAX_BYTES. Before
    move_to_huge_pages: the tile copies are buffers, and move with the weights. Returns the bytes packed."""
    from kernels import cpu_kernels
    from kernels.linear import prepack

    widen = not cpu_kernels.native_bfloat16()   # bfloat16 weights are packed as float32 copies there

    def packed_bytes(weight: torch.Tensor) -> int:
        return weight.numel() * (4 if widen and weight.dtype == torch.bfloat16 else weight.element_size())

    # (not an untied LM head: compute_logits takes its weight directly, through the C kernel, and packed
    # it is no faster)
    linears = [m for m in model.modules() if type(m) is Linear and m is not getattr(model, "lm_head", None)]
    tiled = bool(linears) and linears[0].weight.dtype == torch.bfloat16 and cpu_kernels.linear_native_bfloat16()
    if sum(packed_bytes(m.weight) * (2 if tiled else 1) for m in linears) > PREPACK_MAX_BYTES:
        return 0
    packed = 0
    for m in linears:
        m.packed_weight = prepack(m.weight.data)
        if m.packed_weight is not None:
            packed += packed_bytes(m.weight)
        m.tiles = cpu_kernels.pack_tiles(m.weight.data)
        if m.tiles is not None:
            packed += m.tiles.numel() * m.tiles.element_size()
    return packed


@dataclass(slots=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor      # [num_tokens] int64: cache slot of each new token
    block_tables: torch.Tensor      # [num_seqs, max_blocks_per_seq] int32
    seq_lens: torch.Tensor          # [num_seqs] int32: tokens in the cache, new ones included
    query_start_loc: torch.Tensor   # [num_seqs + 1] int32
    kernel_impl: str | None = None
    kernel_rows: object = None      # on the CPU: the step's kernels.kernel_rows, computed once for every layer


class Attention(nn.Module):
    def __init__(self, args: LlamaArgs):
        super().__init__()
        self.num_heads = args.num_attention_heads
        self.num_kv_heads = args.num_key_value_heads
        self.head_dim = args.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim ** -0.5
        self.qkv_proj = Linear(args.hidden_size, self.q_size + 2 * self.kv_size, bias=args.attention_bias)
        self.o_proj = Linear(self.q_size, args.hidden_size, bias=False)

    def forward(self, x, positions, cos_sin, kv_cache, meta: AttentionMetadata):
        qkv = self.qkv_proj(x, meta.kernel_impl)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(-1, self.num_heads, self.head_dim)       # [num_tokens, num_heads, head_dim]
        k = k.reshape(-1, self.num_kv_heads, self.head_dim)    # [num_tokens, num_kv_heads, head_dim]
        v = v.reshape(-1, self.num_kv_heads, self.head_dim)
        kernels.rotary_embedding(positions, q, k, cos_sin, impl=meta.kernel_impl)
        k_cache, v_cache = kv_cache
        kernels.store_kv(k, v, k_cache, v_cache, meta.slot_mapping, impl=meta.kernel_impl)
        out = kernels.paged_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens,
                                      meta.query_start_loc, self.scale, impl=meta.kernel_impl, rows=meta.kernel_rows)
        return self.o_proj(out.reshape(-1, self.q_size), meta.kernel_impl)


class MLP(nn.Module):
    def __init__(self, args: LlamaArgs):
        super().__init__()
        self.intermediate_size = args.intermediate_size
        self.gate_up_proj = Linear(args.hidden_size, 2 * args.intermediate_size, bias=args.mlp_bias)
        self.down_proj = Linear(args.intermediate_size, args.hidden_size, bias=args.mlp_bias)

    def forward(self, x, impl: str | None = None):
        return self.down_proj(kernels.silu_and_mul(self.gate_up_proj(x, impl), impl=impl), impl)


class DecoderLayer(nn.Module):
    def __init__(self, args: LlamaArgs):
        super().__init__()
        self.eps = args.rms_norm_eps
        self.self_attn = Attention(args)
        self.mlp = MLP(args)
        self.input_layernorm = nn.Parameter(torch.ones(args.hidden_size))
        self.post_attention_layernorm = nn.Parameter(torch.ones(args.hidden_size))

    def forward(self, x, residual, positions, cos_sin, kv_cache, meta):
        impl = meta.kernel_impl
        if residual is None:
            residual = x
            h = kernels.rms_norm(x, self.input_layernorm, self.eps, impl=impl)
        else:
            h, residual = kernels.rms_norm(x, self.input_layernorm, self.eps, residual, impl=impl)
        h = self.self_attn(h, positions, cos_sin, kv_cache, meta)
        h, residual = kernels.rms_norm(h, self.post_attention_layernorm, self.eps, residual, impl=impl)
        return self.mlp(h, impl), residual


class LlamaForCausalLM(nn.Module):
    def __init__(self, args: LlamaArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args) for _ in range(args.num_hidden_layers))
        self.norm = nn.Parameter(torch.ones(args.hidden_size))
        self.lm_head = None if args.tie_word_embeddings else Linear(args.hidden_size, args.vocab_size, bias=False)
        # [max_position, head_dim]: cos | sin, filled by the loader from the config's RoPE settings
        self.register_buffer("cos_sin_cache", torch.empty(0), persistent=False)

    def forward(self, input_ids, positions, kv_caches, meta: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions: [num_tokens]. Returns hidden states [num_tokens, hidden] before the
        final norm (applied in compute_logits to the rows that are sampled only)."""
        x = self.embed_tokens(input_ids)
        if _cpu_kernels_run(x.device, meta.kernel_impl):
            meta.kernel_rows = kernels.kernel_rows(meta.block_tables, meta.seq_lens.tolist(),
                                                   meta.query_start_loc.tolist())
            plan = self._decode_layers_for(x, kv_caches, meta.kernel_rows)
            if plan is not None:
                x, residual = plan.run(x, positions, meta.slot_mapping, meta.kernel_rows, self.layers[0].self_attn.scale)
                return x + residual
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches):
            x, residual = layer(x, residual, positions, self.cos_sin_cache, kv_cache, meta)
        return x + residual

    def _decode_layers_for(self, x, kv_caches, rows):
        """On the CPU, a step of few tokens whose every attention row (`rows`: kernels.kernel_rows) the
        compiled kernel takes runs all layers in one call (kernels/cpu_kernels.py DecodeLayers): that
        plan, else None."""
        plan = self._decode_layers(kv_caches)
        if plan is None or x.shape[0] > plan.max_tokens or rows.long_chunks or rows.count != x.shape[0]:
            return None
        return plan

    def one_call_tokens(self, kv_caches, kernel_impl: str | None) -> int | None:
        """The most tokens a step may hold and still run all layers in one compiled call (on the CPU,
        its attention rows permitting: _decode_layers_for); None where steps go op by op."""
        if not _cpu_kernels_run(self.embed_tokens.weight.device, kernel_impl):
            return None
        plan = self._decode_layers(kv_caches)
        return None if plan is None else plan.max_tokens

    def _decode_layers(self, kv_caches):
        cached = self.__dict__.get("_decode_layers_plan")
        if cached is None or cached[0] is not kv_caches:
            cached = (kv_caches, self._build_decode_layers(kv_caches))
            self.__dict__["_decode_layers_plan"] = cached
        return cached[1]

    def _build_decode_layers(self, kv_caches):
        from kernels import cpu_kernels

        attn = self.layers[0].self_attn
        if not all(type(m) is Linear for layer in self.layers
                   for m in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj,
                             layer.mlp.down_proj)):
            return None   # tensor-parallel shards: their layers all-reduce between ops
        if attn.num_heads % attn.num_kv_heads or not cpu_kernels.supports(
                torch.empty(1, attn.num_heads, attn.head_dim, dtype=kv_caches[0][0].dtype), kv_caches[0][0]):
            return None
        layers = [{"input_norm": layer.input_layernorm.data, "post_norm": layer.post_attention_layernorm.data,
                   "qkv_w": layer.self_attn.qkv_proj.weight.data,
                   "qkv_b": None if layer.self_attn.qkv_proj.bias is None else layer.self_attn.qkv_proj.bias.data,
                   "o_w": layer.self_attn.o_proj.weight.data, "gate_up_w": layer.mlp.gate_up_proj.weight.data,
                   "gate_up_b": None if layer.mlp.gate_up_proj.bias is None else layer.mlp.gate_up_proj.bias.data,
                   "down_w": layer.mlp.down_proj.weight.data,
                   "down_b": None if layer.mlp.down_proj.bias is None else layer.mlp.down_proj.bias.data,
                   "k_cache": k_cache, "v_cache": v_cache,
                   "qkv_wp": layer.self_attn.qkv_proj.tiles, "o_wp": layer.self_attn.o_proj.tiles,
                   "gate_up_wp": layer.mlp.gate_up_proj.tiles, "down_wp": layer.mlp.down_proj.tiles}
                  for layer, (k_cache, v_cache) in zip(self.layers, kv_caches)]
        if not cpu_kernels.DecodeLayers.usable(layers, self.cos_sin_cache):
            return None
        return cpu_kernels.DecodeLayers(layers, num_heads=attn.num_heads, num_kv_heads=attn.num_kv_heads,
                                        head_dim=attn.head_dim, eps=self.layers[0].eps, cos_sin=self.cos_sin_cache)

    def compute_logits(self, hidden: torch.Tensor, impl: str | None = None) -> torch.Tensor:
        h = kernels.rms_norm(hidden, self.norm, self.args.rms_norm_eps, impl=impl)
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return kernels.linear_float32_out(h, weight, impl=impl)


def _cpu_kernels_run(device: torch.device, kernel_impl: str | None) -> bool:
    """Whether a step on `device` with `kernel_impl` takes the compiled CPU kernels (and so may run
    as one call)."""
    return device.type == "cpu" and kernel_impl in (None, "cpu")

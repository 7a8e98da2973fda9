import random

import pytest

from worker.engine.tiny import build_tiny_model

# name -> build_tiny_model overrides: GQA and not, tied and untied, different rope theta
TINY_CONFIGS = {
    "gqa-tied": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=10000.0),
    "mha-untied": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False,
                       rope_theta=500000.0, seed=1),
    "mqa-3layer": dict(num_attention_heads=4, num_key_value_heads=1, num_hidden_layers=3,
                       rope_theta=1000000.0, seed=2, hidden_size=96, intermediate_size=160),
}


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {name: build_tiny_model(root / name, **cfg) for name, cfg in TINY_CONFIGS.items()}


@pytest.fixture(scope="session")
def tiny_model(tiny_models):
    return tiny_models["gqa-tied"]


def make_prompts(n=16, seed=0, vocab=320, shared_prefix=35):
    """Prompts of varied lengths; half share a prefix, so prefix caching has something to hit."""
    rng = random.Random(seed)
    prefix = [rng.randrange(3, vocab) for _ in range(shared_prefix)]
    prompts = []
    for i in range(n):
        tail = [rng.randrange(3, vocab) for _ in range(rng.randint(1, 60))]
        prompts.append(prefix + tail if i % 2 else tail)
    return prompts


_hf_cache = {}


def hf_greedy(model_dir, prompts, max_new_tokens):
    """transformers' own greedy generate, one prompt at a time (no padding involved)."""
    import torch
    from transformers import AutoModelForCausalLM

    key = (str(model_dir), max_new_tokens)
    if key not in _hf_cache:
        _hf_cache[key] = {}
    cache = _hf_cache[key]
    missing = [p for p in prompts if tuple(p) not in cache]
    if missing:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        model.eval()
        with torch.no_grad():
            for p in missing:
                out = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                     max_new_tokens=max_new_tokens, do_sample=False)
                cache[tuple(p)] = out[0, len(p):].tolist()
    return [cache[tuple(p)] for p in prompts]

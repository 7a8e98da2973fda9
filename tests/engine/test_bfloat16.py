"""bfloat16 end to end: transformers in bfloat16 agrees with every token genq's bfloat16 greedy
decoding picks. Token-for-token equality is asked of float32 only (tests/engine/
test_greedy_equivalence.py): in bfloat16 two implementations that sum in different orders differ
by a few units in the last place of a logit, enough to flip a near-tie."""
import pytest
import torch

from tests.engine.conftest import TINY_CONFIGS, make_prompts
from worker.engine import LLM, SamplingParams

# a logit near 5 has a bfloat16 step of 2^-5; a wrong computation misses by whole units
TOLERANCE = 0.25


@pytest.mark.parametrize("config", list(TINY_CONFIGS))
def test_bfloat16_greedy_tokens_are_transformers_top_choices(tiny_models, config):
    from transformers import AutoModelForCausalLM

    model_dir = tiny_models[config]
    prompts = make_prompts(16, seed=3)
    llm = LLM(model=model_dir, dtype="bfloat16")
    assert llm.engine.model.embed_tokens.weight.dtype == torch.bfloat16
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    exact = total = 0
    with torch.no_grad():
        for prompt, out in zip(prompts, outs):
            tokens = out.outputs[0].token_ids
            assert len(tokens) == 12
            # transformers' logits at each position genq sampled from, its own tokens fed back in
            logits = hf(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:-1].float()
            chosen = logits.gather(1, torch.tensor(tokens)[:, None])[:, 0]
            best = logits.max(dim=1).values
            assert (best - chosen).max().item() <= TOLERANCE, (prompt, tokens)
            exact += int((chosen == best).sum())
            total += len(tokens)
    assert exact >= 0.9 * total, f"only {exact} of {total} tokens are transformers' own argmax"

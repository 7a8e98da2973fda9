"""Greedy outputs equal transformers' generate token for token, under every scheduling regime."""
import pytest

from tests.engine.conftest import TINY_CONFIGS, hf_greedy, make_prompts
from worker.engine import LLM, LLMEngine, SamplingParams

MAX_TOKENS = 24
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)

REGIMES = {
    "default": dict(),
    "no-prefix-cache": dict(enable_prefix_caching=False),
    "chunked-prefill": dict(max_num_batched_tokens=16),
    "preemption": dict(num_kv_blocks=16, block_size=8),
    "small-blocks-few-seqs": dict(block_size=4, max_num_seqs=3, num_kv_blocks=200),
}


@pytest.mark.parametrize("config", list(TINY_CONFIGS))
@pytest.mark.parametrize("regime", list(REGIMES))
def test_greedy_matches_transformers(tiny_models, config, regime):
    model_dir = tiny_models[config]
    prompts = make_prompts(16, seed=hash(config) % 100)
    expected = hf_greedy(model_dir, prompts, MAX_TOKENS)
    llm = LLM(model=model_dir, **REGIMES[regime])
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    got = [o.outputs[0].token_ids for o in outs]
    assert got == expected
    stats = llm.engine.stats()
    if regime == "preemption":
        assert stats.preemptions > 0
    if regime == "default":
        assert stats.max_batch_size > 1
        # a second pass finds the prompts' full blocks in the prefix cache, and still matches
        again = llm.generate(prompts, GREEDY, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in again] == expected
        assert llm.engine.stats().prefix_cache_hits > 0
        assert sum(o.num_cached_tokens for o in again) > 0
    if regime == "no-prefix-cache":
        assert stats.prefix_cache_hits == 0
    assert stats.kv_blocks_used == 0   # nothing leaked
    assert stats.running == stats.waiting == 0


def test_requests_added_mid_generation(tiny_model):
    prompts = make_prompts(16, seed=7)
    expected = hf_greedy(tiny_model, prompts, MAX_TOKENS)
    engine = LLMEngine(model=tiny_model, max_num_batched_tokens=64)
    done = {}
    pending = list(enumerate(prompts))
    steps = 0
    while pending or engine.has_unfinished_requests():
        # two new requests join every other step while earlier ones are mid-generation
        if pending and steps % 2 == 0:
            for _ in range(2):
                if pending:
                    i, p = pending.pop(0)
                    engine.add_request(str(i), p, GREEDY)
        for out in engine.step():
            if out.finished:
                done[int(out.request_id)] = out.outputs[0].token_ids
        steps += 1
        assert steps < 1000
    assert [done[i] for i in range(len(prompts))] == expected
    assert engine.stats().kv_blocks_used == 0


def test_streamed_deltas_join_to_final(tiny_model):
    engine = LLMEngine(model=tiny_model)
    prompts = make_prompts(6, seed=3)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, SamplingParams(temperature=0, max_tokens=30))
    ids = {str(i): [] for i in range(len(prompts))}
    texts = {str(i): "" for i in range(len(prompts))}
    final = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            ids[out.request_id] += out.outputs[0].new_token_ids
            texts[out.request_id] += out.outputs[0].new_text
            if out.finished:
                final[out.request_id] = out.outputs[0]
    for rid, comp in final.items():
        assert ids[rid] == comp.token_ids
        assert texts[rid] == comp.text
        assert comp.text == engine.tokenizer.decode(comp.token_ids, skip_special_tokens=True)

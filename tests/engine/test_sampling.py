"""Sampling params, seeds, stop conditions, detokenization, abort, parallel samples, bad input."""
import pytest

from tests.engine.conftest import hf_greedy, make_prompts
from worker.engine import LLM, LLMEngine, SamplingParams
from worker.engine.detokenizer import IncrementalDetokenizer


@pytest.fixture(scope="module")
def llm(tiny_model):
    return LLM(model=tiny_model)


def test_seeded_sampling_is_reproducible_across_batch_compositions(llm):
    params = SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=1234, max_tokens=20, ignore_eos=True)
    prompt = make_prompts(1, seed=11)[0]
    alone = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
    others = make_prompts(7, seed=12)
    mixed_params = [SamplingParams(temperature=1.0, max_tokens=15)] * 3 + [params] + \
        [SamplingParams(temperature=0, max_tokens=9)] * 4
    batch = llm.generate(others[:3] + [prompt] + others[3:], mixed_params, use_tqdm=False)
    assert batch[3].outputs[0].token_ids == alone
    different_seed = SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=99, max_tokens=20, ignore_eos=True)
    assert llm.generate([prompt], different_seed, use_tqdm=False)[0].outputs[0].token_ids != alone


def test_max_tokens_min_tokens_and_ignore_eos(llm, tiny_model):
    prompts = make_prompts(8, seed=5)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12, min_tokens=12, ignore_eos=True),
                        use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 12 and o.outputs[0].finish_reason == "length" for o in outs)


def test_eos_stops_with_reason_stop(llm):
    eos = llm.tokenizer.eos_token_id
    params = SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[])
    # find a prompt whose greedy continuation is cut: ask for a stop token id that greedy produces
    out = llm.generate(make_prompts(1, seed=21)[0], params, use_tqdm=False)[0].outputs[0]
    token = out.token_ids[3]
    cut = llm.generate(make_prompts(1, seed=21)[0], SamplingParams(temperature=0, max_tokens=30,
                                                                  stop_token_ids=[token]), use_tqdm=False)[0]
    first = out.token_ids.index(token)
    assert cut.outputs[0].token_ids == out.token_ids[:first + 1]
    assert cut.outputs[0].finish_reason == "stop"
    assert eos in llm.engine.eos_token_ids


def test_stop_string_cuts_text_even_across_tokens(llm):
    prompt = make_prompts(1, seed=31)[0]
    full = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True), use_tqdm=False)[0]
    text = full.outputs[0].text
    assert len(text) > 12
    stop = text[7:12]          # a stop string that likely spans a token boundary
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=[stop]),
                       use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop"
    assert out.text == text[:text.index(stop)]
    assert stop not in out.text


def test_incremental_detokenizer_handles_split_multibyte_characters(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    text = "Grüße aus München 東京 🙂🚀 naïve"
    ids = tok.encode(text, add_special_tokens=False)
    assert any("\ufffd" in tok.decode([i]) for i in ids)   # some tokens hold partial characters
    detok = IncrementalDetokenizer(tok, [], stop=None)
    pieces = []
    for i in ids:
        detok.add(i)
        pieces.append(detok.take_new_text(False))
    detok.flush()
    pieces.append(detok.take_new_text(True))
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_stop_string_is_held_back_from_the_stream(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    detok = IncrementalDetokenizer(tok, [], stop=["STOP"])
    streamed = ""
    hit = None
    for i in tok.encode("hello world STOP and more", add_special_tokens=False):
        hit = detok.add(i)
        streamed += detok.take_new_text(hit is not None)
        if hit:
            break
    assert hit == "STOP"
    assert streamed == "hello world "


def test_abort_frees_blocks_at_once_and_reports_abort(tiny_model):
    engine = LLMEngine(model=tiny_model, num_kv_blocks=64)
    for i, p in enumerate(make_prompts(4, seed=41)):
        engine.add_request(str(i), p, SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    for _ in range(3):
        engine.step()
    used = engine.stats().kv_blocks_used
    held = len(engine.requests["2"].seqs[0].blocks)
    engine.abort_request("2")
    assert engine.stats().kv_blocks_used == used - held
    outs = {o.request_id: o for o in engine.step()}
    assert outs["2"].finished and outs["2"].outputs[0].finish_reason == "abort"
    assert len(outs["2"].outputs[0].token_ids) == 3
    engine.abort_request("2")          # unknown or finished: ignored
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.stats().kv_blocks_used == 0


def test_parallel_samples_share_the_prompt_copy_on_write(tiny_model):
    prompt = make_prompts(2, seed=51)[1]           # long enough for several blocks
    engine = LLMEngine(model=tiny_model, block_size=4, num_kv_blocks=200)
    engine.add_request("one", prompt, SamplingParams(temperature=0, max_tokens=1))
    engine.step()
    engine.add_request("n4", prompt + [5], SamplingParams(temperature=0.8, seed=3, n=4, max_tokens=16,
                                                          ignore_eos=True))
    engine.step()                                   # prompt computed, 4 samples forked
    seqs = engine.requests["n4"].seqs
    assert len(seqs) == 4
    prompt_blocks = -(-len(prompt + [5]) // 4)
    assert engine.stats().kv_blocks_used <= prompt_blocks + 1   # not 4 copies
    finals = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
    samples = finals["n4"].outputs
    assert [s.index for s in samples] == [0, 1, 2, 3]
    assert all(len(s.token_ids) == 16 for s in samples)
    assert len({tuple(s.token_ids) for s in samples}) > 1
    assert engine.stats().kv_blocks_used == 0


def test_greedy_n2_gives_two_identical_transformers_outputs(llm, tiny_model):
    prompt = make_prompts(1, seed=61)[0]
    expected = hf_greedy(tiny_model, [prompt], 24)[0]
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=24, n=2), use_tqdm=False)[0]
    assert [o.token_ids for o in out.outputs] == [expected, expected]


def test_logprobs_are_returned_per_token(llm):
    out = llm.generate(make_prompts(1, seed=71)[0], SamplingParams(temperature=0, max_tokens=5, logprobs=3,
                                                                  ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert len(out.logprobs) == 5
    for token, lp in zip(out.token_ids, out.logprobs):
        assert token in lp and len(lp) == 3        # greedy: the chosen token is the top one
        assert max(lp, key=lp.get) == token and all(v <= 0 for v in lp.values())


def test_chat_applies_the_template(llm):
    out = llm.chat([{"role": "user", "content": "hello"}], SamplingParams(temperature=0, max_tokens=4),
                   use_tqdm=False)[0]
    expected = llm.tokenizer.encode("<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n",
                                    add_special_tokens=False)
    assert out.prompt_token_ids == expected


@pytest.mark.parametrize("field,value", [
    ("temperature", -1.0), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -5), ("min_p", 2.0),
    ("max_tokens", 0), ("n", 0), ("min_tokens", 100), ("presence_penalty", 3.0),
    ("repetition_penalty", 0.0), ("logprobs", 50), ("temperature", float("nan")), ("stop", [""]),
])
def test_invalid_sampling_params_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_requests_that_can_never_fit_are_refused(tiny_model):
    engine = LLMEngine(model=tiny_model, num_kv_blocks=4, block_size=16, max_model_len=100)
    with pytest.raises(ValueError, match="max_model_len"):
        engine.add_request("a", list(range(3, 90)), SamplingParams(max_tokens=20))
    with pytest.raises(ValueError, match="whole KV cache"):
        engine.add_request("b", list(range(3, 60)), SamplingParams(max_tokens=20))
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("c", [], SamplingParams())
    with pytest.raises(ValueError, match="token ids"):
        engine.add_request("d", [10 ** 9], SamplingParams())
    engine.add_request("ok", [5, 6], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="already"):
        engine.add_request("ok", [5, 6], SamplingParams(max_tokens=2))
    assert set(engine.requests) == {"ok"}          # refused requests left nothing behind

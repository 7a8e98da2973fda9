"""Tensor parallelism on CPU: two gloo ranks give the greedy outputs of one process, each holds
about half the parameters, and a killed rank fails the engine with TensorParallelError instead
of hanging it."""
import os
import signal
import threading

import pytest
import torch

from tests.engine.conftest import make_prompts
from worker.engine import LLM, SamplingParams
from worker.engine.models.llama import LlamaArgs
from worker.engine.parallel import ShardPlan, TensorParallelError
from worker.engine.parallel.sharding import shard_state
from worker.engine.tiny import build_tiny_model

GREEDY = SamplingParams(temperature=0, max_tokens=16)
GREEDY_PAIR = SamplingParams(temperature=0, max_tokens=16, n=2)   # forks share blocks: copy-on-write
# Small blocks and token budget: chunked prefill, copy-on-write and prefix-cache hits all occur.
ENGINE_ARGS = dict(block_size=8, num_kv_blocks=160, max_num_batched_tokens=96)
# gqa-untied: 4 query and 2 KV heads, 2 + 1 per rank, its own LM head, and an odd vocabulary (319
# tokens: the second vocabulary shard is padded). mqa-3layer: 1 KV head, replicated on both
# ranks; tied embeddings.
MODELS = {"gqa-untied": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                             vocab_size=319, seed=3),
          "mqa-3layer": None}


@pytest.fixture(scope="module", params=list(MODELS))
def engines(request, tiny_models, tmp_path_factory):
    """(name, one-process LLM, two-rank LLM) for one tiny model; one two-rank engine at a time."""
    name = request.param
    if MODELS[name] is None:
        model_dir = tiny_models[name]
    else:
        model_dir = build_tiny_model(tmp_path_factory.mktemp("tp") / name, **MODELS[name])
    single = LLM(model=model_dir, **ENGINE_ARGS)
    tp = LLM(model=model_dir, tensor_parallel_size=2, tp_timeout_seconds=30, **ENGINE_ARGS)
    yield name, single, tp
    tp.engine.shutdown()


def test_the_rank_timeout_comes_from_the_config(engines):
    _, _, tp = engines
    assert tp.engine.config.tp_timeout_seconds == 30 and tp.engine.tp.timeout_s == 30


def _tokens(outs):
    return [[c.token_ids for c in o.outputs] for o in outs]


def test_greedy_outputs_equal_one_process(engines):
    name, single, tp = engines
    prompts = make_prompts(12, seed=len(name), vocab=319)
    params = [GREEDY_PAIR if i % 4 == 0 else GREEDY for i in range(len(prompts))]
    expected = _tokens(single.generate(prompts, params, use_tqdm=False))
    assert _tokens(tp.generate(prompts, params, use_tqdm=False)) == expected
    # again: the prompts' full blocks now come from the prefix cache, on every rank alike
    assert _tokens(tp.generate(prompts, params, use_tqdm=False)) == expected
    stats = tp.engine.stats()
    assert stats.prefix_cache_hits > 0 and stats.max_batch_size > 1
    assert stats.tensor_parallel_size == 2 and stats.healthy is True
    assert stats.kv_blocks_used == 0


def test_each_rank_holds_about_half_the_parameters(engines):
    name, single, tp = engines
    whole = sum(p.numel() * p.element_size() for p in single.engine.model.parameters())
    whole_kv = sum(t.numel() * t.element_size() for kv in single.engine.runner.kv_caches for t in kv)
    ranks = tp.engine.tp.rank_stats()
    assert [r["rank"] for r in ranks] == [0, 1]
    assert ranks[0]["pid"] == os.getpid() != ranks[1]["pid"]
    for r in ranks:
        print(f"{name} rank {r['rank']}: {r['param_bytes']} of {whole} parameter bytes "
              f"({r['param_bytes'] / whole:.3f}), KV cache {r['kv_cache_bytes']} of {whole_kv}")
        assert 0.45 < r["param_bytes"] / whole < 0.56
    if name == "gqa-untied":   # KV heads split: half the cache each
        assert [r["kv_head_start"] for r in ranks] == [0, 1]
        assert all(r["kv_cache_bytes"] * 2 == whole_kv for r in ranks)
    else:                      # one KV head, replicated: the whole cache each
        assert [r["kv_head_start"] for r in ranks] == [0, 0]
        assert all(r["kv_cache_bytes"] == whole_kv for r in ranks)


def _generate_in_thread(llm, prompts, timeout):
    result = {}

    def target():
        try:
            result["outs"] = llm.generate(prompts, GREEDY, use_tqdm=False)
        except BaseException as exc:
            result["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"the engine hung for {timeout}s after a rank died"
    return result


@pytest.mark.timeout(120)
def test_killed_rank_fails_the_engine(engines):
    """gqa-untied: the rank dies between steps (the liveness check finds it); mqa-3layer: it
    dies during a step, while rank 0 is in the step's collectives."""
    name, _, tp = engines
    engine = tp.engine
    rank1 = engine.tp._ranks[0].process
    if name == "gqa-untied":
        os.kill(rank1.pid, signal.SIGKILL)
        rank1.join(10)
        assert engine.stats().healthy is False   # noticed while idle, before any step
    else:
        engine.step_hook = lambda batch: os.kill(rank1.pid, signal.SIGKILL)
    result = _generate_in_thread(tp, make_prompts(4, seed=5, vocab=319), timeout=60)
    error = result.get("error")
    assert isinstance(error, TensorParallelError), result
    assert "rank 1" in str(error)
    assert not rank1.is_alive() and rank1.exitcode == -signal.SIGKILL
    stats = engine.stats()
    assert stats.healthy is False and "rank 1" in stats.tensor_parallel_error
    # the engine stays down: later work fails at once with the same error
    engine.step_hook = None
    engine.add_request("after", [5, 6, 7], GREEDY)
    with pytest.raises(TensorParallelError, match="down"):
        engine.step()


def test_sizes_that_do_not_divide_the_model_are_refused(tiny_model):
    with pytest.raises(ValueError, match="tensor_parallel_size=3 cannot shard"):
        LLM(model=tiny_model, tensor_parallel_size=3)


def _args(heads, kv_heads, vocab=10):
    return LlamaArgs(vocab_size=vocab, hidden_size=heads * 2, intermediate_size=8, num_hidden_layers=1,
                     num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=2, rms_norm_eps=1e-5,
                     max_position_embeddings=64, tie_word_embeddings=True)


@pytest.mark.parametrize("heads, kv_heads, world, kv_starts, kv_counts, head_counts", [
    (4, 2, 2, [0, 1], [1, 1], [2, 2]),
    (4, 4, 2, [0, 2], [2, 2], [2, 2]),
    (4, 1, 2, [0, 0], [1, 1], [2, 2]),          # the KV head replicated
    (8, 2, 4, [0, 0, 1, 1], [1, 1, 1, 1], [2, 2, 2, 2]),
    (9, 3, 2, [0, 2], [2, 1], [6, 3]),          # SmolLM2-135M: whole KV groups, rank 0 the larger
    (6, 2, 4, [0, 0, 1, 1], [1, 1, 1, 1], [2, 1, 2, 1]),
])
def test_shard_plan_deals_heads_with_their_kv_heads(heads, kv_heads, world, kv_starts, kv_counts, head_counts):
    plans = [ShardPlan.for_rank(_args(heads, kv_heads), r, world) for r in range(world)]
    assert [p.kv_head_start for p in plans] == kv_starts
    assert [p.num_kv_heads for p in plans] == kv_counts
    assert [p.num_heads for p in plans] == head_counts
    # the ranks' query heads tile the model's, and each one's KV head (by the model's grouping)
    # is on the rank that holds the query head
    assert [h for p in plans for h in range(p.head_start, p.head_start + p.num_heads)] == list(range(heads))
    group = heads // kv_heads
    for p in plans:
        for h in range(p.head_start, p.head_start + p.num_heads):
            assert p.kv_head_start <= h // group < p.kv_head_start + p.num_kv_heads


def test_shards_reassemble_to_the_whole_state():
    args = _args(4, 2, vocab=11)   # 11 rows over 2 ranks: the last shard is padded
    d, inter = args.head_dim, args.intermediate_size
    torch.manual_seed(0)
    state = {"embed_tokens.weight": torch.randn(11, args.hidden_size),
             "layers.0.self_attn.qkv_proj.weight": torch.randn((4 + 2 * 2) * d, args.hidden_size),
             "layers.0.self_attn.o_proj.weight": torch.randn(args.hidden_size, 4 * d),
             "layers.0.mlp.gate_up_proj.weight": torch.randn(2 * inter, args.hidden_size),
             "layers.0.mlp.down_proj.weight": torch.randn(args.hidden_size, inter),
             "layers.0.input_layernorm": torch.randn(args.hidden_size)}
    shards = [shard_state(state, ShardPlan.for_rank(args, r, 2)) for r in range(2)]
    embed = torch.cat([s["embed_tokens.weight"] for s in shards])
    assert embed.shape[0] == 12 and torch.equal(embed[:11], state["embed_tokens.weight"]) and not embed[11].any()
    q, k, v = zip(*(s["layers.0.self_attn.qkv_proj.weight"].split([2 * d, d, d]) for s in shards))
    assert torch.equal(torch.cat(q + k + v), state["layers.0.self_attn.qkv_proj.weight"])
    gate, up = zip(*(s["layers.0.mlp.gate_up_proj.weight"].split(inter // 2) for s in shards))
    assert torch.equal(torch.cat(gate + up), state["layers.0.mlp.gate_up_proj.weight"])
    for name in ("layers.0.self_attn.o_proj.weight", "layers.0.mlp.down_proj.weight"):
        assert torch.equal(torch.cat([s[name] for s in shards], dim=1), state[name])
    assert all(torch.equal(s["layers.0.input_layernorm"], state["layers.0.input_layernorm"]) for s in shards)

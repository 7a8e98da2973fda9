"""On the CPU, steps of few tokens run every decoder layer in one compiled call
(kernels/cpu_kernels.py DecodeLayers); it must give bit for bit what the per-op path gives, and be
taken only where it applies."""
import pytest
import torch

from kernels import cpu_kernels
from tests.engine.conftest import make_prompts
from worker.engine import LLM, SamplingParams
from worker.engine.models.llama import LlamaForCausalLM

pytestmark = pytest.mark.skipif(not (cpu_kernels.available() and cpu_kernels.linear_available()),
                                reason="the compiled kernels (and the AVX-512 linear kernel) are not built here")

PARAMS = SamplingParams(temperature=0, max_tokens=12, logprobs=3)


def generate(model_dir, prompts, monkeypatch, *, fused: bool, **engine_args):
    calls = []
    real = cpu_kernels.DecodeLayers.run
    monkeypatch.setattr(cpu_kernels.DecodeLayers, "run", lambda self, *a: calls.append(a[0].shape[0]) or real(self, *a))
    if not fused:
        monkeypatch.setattr(LlamaForCausalLM, "_build_decode_layers", lambda self, kv_caches: None)
    llm = LLM(model=str(model_dir), **engine_args)
    outs = llm.generate(prompts, PARAMS, use_tqdm=False)
    monkeypatch.undo()
    calls.append(llm.engine.stats().steps)   # last: the engine's steps, fused or not
    return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outs], calls


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("config", ["gqa-tied", "mha-untied", "mqa-3layer"])
def test_one_call_per_step_equals_the_per_op_path(tiny_models, monkeypatch, config, dtype):
    prompts = make_prompts(6, seed=5)
    # a 16-token budget: prompts arrive in chunks (short prefill rows in the fused call) beside decode rows
    args = dict(dtype=dtype, max_num_batched_tokens=16)
    fused, (*calls, _) = generate(tiny_models[config], prompts, monkeypatch, fused=True, **args)
    per_op, (*none, _) = generate(tiny_models[config], prompts, monkeypatch, fused=False, **args)
    assert calls and not none
    assert max(calls) > len(prompts)          # some fused steps held prefill chunk rows too
    assert fused == per_op                    # tokens and logprobs, exactly


def test_not_taken_for_long_contexts_or_wide_steps(tiny_model, monkeypatch):
    # A 600-token prompt's chunks are over contexts past PREFILL_IN_KERNEL_MAX_CONTEXT (SDPA), and a
    # step wider than the linear kernel's row limit goes op by op; both still match the per-op path.
    long_prompt = make_prompts(1, seed=9, shared_prefix=600)[0][:600]
    prompts = [long_prompt] + make_prompts(60, seed=11)
    fused, (*calls, steps) = generate(tiny_model, prompts, monkeypatch, fused=True, max_num_batched_tokens=256)
    per_op, _ = generate(tiny_model, prompts, monkeypatch, fused=False, max_num_batched_tokens=256)
    assert fused == per_op
    assert calls and max(calls) <= cpu_kernels.LINEAR_MAX_ROWS
    assert len(calls) < steps                 # the wide and the long-context steps went op by op


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_steps_as_wide_as_the_row_limit_run_in_one_call(tiny_model, monkeypatch, dtype):
    # A budget of exactly the kernel's row limit for the dtype: full steps (prompt chunks beside
    # decode rows) reach it and still run in one call, and a step one token wider does not.
    if dtype == "bfloat16" and cpu_kernels.native_bfloat16() and not cpu_kernels.linear_native_bfloat16():
        pytest.skip("bfloat16 on this CPU goes to oneDNN: the compiler here lacks vdpbf16ps")
    limit = cpu_kernels.linear_max_rows(getattr(torch, dtype))
    if dtype == "bfloat16" and cpu_kernels.linear_native_bfloat16():   # tile-packed projections: one call holds more
        limit = max(limit, cpu_kernels.ONE_CALL_MAX_TOKENS_TILES)
    prompts = make_prompts(8, seed=13, shared_prefix=90)
    fused, (*calls, steps) = generate(tiny_model, prompts, monkeypatch, fused=True, dtype=dtype,
                                      max_num_batched_tokens=limit)
    per_op, _ = generate(tiny_model, prompts, monkeypatch, fused=False, dtype=dtype, max_num_batched_tokens=limit)
    assert fused == per_op
    assert max(calls) == limit and len(calls) == steps
    _, (*wider, wider_steps) = generate(tiny_model, prompts, monkeypatch, fused=True, dtype=dtype,
                                        max_num_batched_tokens=limit + 1)
    assert wider and max(wider) <= limit and len(wider) < wider_steps   # the full steps went op by op


def test_projection_biases(tmp_path, monkeypatch):
    """Qwen2's q/k/v biases pass through the fused call too."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from worker.engine.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(3)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.5)
    model.save_pretrained(tmp_path, safe_serialization=True)
    tokenizer.save_pretrained(tmp_path)
    prompts = make_prompts(4, seed=2)
    fused, (*calls, _) = generate(tmp_path, prompts, monkeypatch, fused=True)
    per_op, _ = generate(tmp_path, prompts, monkeypatch, fused=False)
    assert calls and fused == per_op


def test_the_scheduler_knows_how_many_tokens_one_call_takes(tiny_models, monkeypatch):
    model_dir = str(tiny_models["gqa-tied"])
    llm = LLM(model=model_dir, max_num_batched_tokens=16)
    assert llm.engine.scheduler.one_call_tokens == cpu_kernels.linear_max_rows(torch.float32)
    assert LLM(model=model_dir, kernel_impl="torch").engine.scheduler.one_call_tokens is None
    monkeypatch.setattr(LlamaForCausalLM, "_build_decode_layers", lambda self, kv_caches: None)
    assert LLM(model=model_dir).engine.scheduler.one_call_tokens is None    # no plan: op by op

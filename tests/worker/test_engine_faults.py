"""Engine faults inside the engine service: a step that raises fails that step's requests and the
service keeps serving; running out of KV blocks preempts (and recomputes), never crashes."""
from __future__ import annotations

from worker.engine import LLMEngine, SamplingParams
from worker.engine_service import EngineService, GenerationRequest
from worker.faults import install_fault


def generate(service, prompts, max_tokens):
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    handles = [service.submit(GenerationRequest(request_id=f"{p}-{i}", params=params, prompt=p))
               for i, p in enumerate(prompts)]
    return [h.wait(120) for h in handles]


def test_an_injected_step_fault_fails_its_requests_and_the_loop_keeps_serving(tiny_model_dir):
    engine = LLMEngine(str(tiny_model_dir), num_kv_blocks=256, max_num_seqs=8)
    install_fault(engine, "step_error:BOOM")
    service = EngineService(engine).start()
    try:
        [bad] = generate(service, ["BOOM goes the step"], 8)
        assert bad.error_type == "engine_error" and "injected step fault" in bad.error_message
        good = generate(service, [f"fine {i}" for i in range(4)], 8)
        assert all(r.error_type is None and len(r.token_ids) == 8 for r in good)
        assert service.running
    finally:
        service.stop()


def test_out_of_kv_blocks_is_preemption_not_a_crash(tiny_model_dir):
    # 12 blocks of 16 tokens; each request needs up to 4 blocks, 8 of them at once need 32.
    engine = LLMEngine(str(tiny_model_dir), num_kv_blocks=12, block_size=16, max_num_seqs=8)
    service = EngineService(engine).start()
    try:
        results = generate(service, [f"request number {i}" for i in range(8)], 48)
        assert all(r.error_type is None and len(r.token_ids) == 48 for r in results)
        assert engine.stats().preemptions > 0 and service.running
    finally:
        service.stop()

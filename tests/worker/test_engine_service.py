"""The engine service: a real engine (tiny model) on its own loop thread, real Redis for events."""
from __future__ import annotations

import sys
import threading
import time

import pytest

from app.infra.channels import Channels
from app.infra.redis_client import redis_client
from app.jobs.event_log import EventLog
from worker.engine import LLMEngine, SamplingParams
from worker.engine_service import EngineService, GenerationRequest


@pytest.fixture(scope="module")
def events(settings):
    return EventLog(redis_client(settings.redis_url), Channels(settings.key_prefix), ttl_seconds=600)


@pytest.fixture(scope="module")
def service(engine, events):
    service = EngineService(engine, events, stats_interval=0.05).start()
    yield service
    service.stop()


def offline(model_dir, prompts, params) -> list:
    reference = LLMEngine(model_dir, num_kv_blocks=512)
    for i, prompt in enumerate(prompts):
        reference.add_request(f"ref-{i}", prompt, params)
    done = {}
    while reference.has_unfinished_requests():
        for out in reference.step():
            if out.finished:
                done[out.request_id] = out.outputs[0]
    return [done[f"ref-{i}"] for i in range(len(prompts))]


def test_concurrent_requests_share_steps_and_match_offline(service, events, engine, tiny_model_dir):
    prompts = [f"Request {i}: the quick brown fox" for i in range(12)]
    params = SamplingParams(temperature=0, max_tokens=10)
    steps_before = engine.stats().steps
    generations, barrier = [None] * len(prompts), threading.Barrier(len(prompts))

    def submit(i):
        barrier.wait()
        generations[i] = service.submit(GenerationRequest(f"svc-batch-{i}", params, prompt=prompts[i], attempt=1,
                                                          first_seq=2))

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    results = [g.wait(120) for g in generations]
    expected = offline(tiny_model_dir, prompts, params)
    for i, (result, reference) in enumerate(zip(results, expected)):
        assert result.error_type is None
        assert (result.text, result.token_ids, result.finish_reason) == (reference.text, reference.token_ids,
                                                                         reference.finish_reason)
        assert result.first_token_at is not None and result.prompt_tokens > 0
        logged = events.read(f"svc-batch-{i}")
        assert [str(e.id) for e in logged] == [f"1-{n}" for n in range(2, result.next_seq)]
        assert "".join(e.data["text"] for e in logged) == result.text
        assert [t for e in logged for t in e.data["token_ids"]] == result.token_ids
    assert engine.stats().steps - steps_before < sum(len(r.token_ids) for r in results)
    assert engine.stats().max_batch_size > 1


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="thread names in /proc are Linux's")
def test_the_loop_thread_is_named_for_the_operating_system(service):
    """`top -H` and benchmarks/fairness.py's CPU accounting tell the engine loop from the worker's
    other threads by the name the loop gives its OS thread."""
    def name() -> str:
        with open(f"/proc/self/task/{service._thread.native_id}/comm") as comm:
            return comm.read().strip()

    deadline = time.monotonic() + 5      # (the loop names itself as it starts)
    while name() != "genq-engine" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert name() == "genq-engine"
    with open(f"/proc/self/task/{threading.get_native_id()}/comm") as comm:
        assert comm.read().strip() != "genq-engine"


def test_abort_stops_a_request_and_frees_its_blocks(service, engine):
    params = SamplingParams(temperature=0, max_tokens=1000, ignore_eos=True)
    generation = service.submit(GenerationRequest("svc-abort", params, prompt="Tell me everything", first_seq=2))
    while generation.next_seq < 4 and not generation.done:   # at least two token events went out
        generation._done.wait(0.01)
    service.abort("svc-abort")
    result = generation.wait(60)
    assert result.finish_reason == "abort" and result.error_type is None
    assert 0 < len(result.token_ids) < 1000 and result.text
    service.submit(GenerationRequest("svc-after-abort", SamplingParams(max_tokens=1), prompt="x")).wait(60)
    assert engine.stats().kv_blocks_used == 0   # the aborted request holds no blocks


def test_chat_messages_use_the_chat_template(service, engine, tiny_model_dir):
    messages = [{"role": "user", "content": "Hello there"}]
    params = SamplingParams(temperature=0, max_tokens=6)
    result = service.submit(GenerationRequest("svc-chat", params, messages=messages)).wait(60)
    reference = offline(tiny_model_dir, [engine.apply_chat_template(messages)], params)[0]
    assert result.token_ids == reference.token_ids
    assert result.prompt_tokens == len(engine.apply_chat_template(messages))


def test_request_that_cannot_fit_fails_with_the_engines_reason(service, engine):
    params = SamplingParams(max_tokens=engine.max_model_len + 1)
    result = service.submit(GenerationRequest("svc-too-long", params, prompt="hi")).wait(60)
    assert result.error_type == "invalid_request" and "max_model_len" in result.error_message


def test_stats_are_reported(engine, events):
    reports = []
    service = EngineService(engine, events, stats_interval=0.01, on_stats=reports.append).start()
    try:
        service.submit(GenerationRequest("svc-stats", SamplingParams(max_tokens=3), prompt="x")).wait(60)
        deadline = threading.Event()
        while not reports:
            deadline.wait(0.01)
    finally:
        service.stop()
    assert {"running", "waiting", "kv_blocks_used", "max_batch_size", "jobs_in_flight"} <= set(reports[-1].as_dict())


def test_stopped_service_fails_pending_and_new_requests(engine):
    service = EngineService(engine, None, stats_interval=0.01).start()
    long = service.submit(GenerationRequest("svc-stop", SamplingParams(max_tokens=1000, ignore_eos=True),
                                            prompt="x"))
    while long.next_seq == 1 and not long.done:
        long._done.wait(0.01)
    service.stop()
    assert long.wait(10).error_type == "worker_shutdown"
    assert service.submit(GenerationRequest("svc-late", SamplingParams(), prompt="x")).wait(1).error_type == \
        "worker_shutdown"
    # the engine is left clean for whoever owns it next
    engine.abort_request("svc-stop")
    while engine.has_unfinished_requests():
        engine.step()


def test_a_step_from_nothing_waits_for_jobs_still_arriving(tiny_model_dir):
    """Before a step that starts from nothing, the loop waits (bounded) while the worker says jobs are
    still arriving (claims under way), so a burst is prefilled in one step; never while sequences run."""
    engine = LLMEngine(tiny_model_dir, num_kv_blocks=256)
    arriving = [1]                             # one more job is being claimed
    service = EngineService(engine, None, stats_interval=0.05, arriving=lambda: arriving[0],
                            gather_seconds=30.0).start()
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    try:
        first = service.submit(GenerationRequest("gather-0", params, prompt="the first job", attempt=1))
        time.sleep(0.3)
        assert not first.done and engine.stats().steps == 0   # held for the job still arriving
        second = service.submit(GenerationRequest("gather-1", params, prompt="the second job", attempt=1))
        arriving[0] = 0
        a, b = first.wait(60), second.wait(60)
        assert a.error_type is None and b.error_type is None
        assert a.first_token_at == b.first_token_at              # both prefilled in the same first step
        # While a sequence runs, a newcomer is never held, however many jobs are said to be arriving.
        long = service.submit(GenerationRequest("gather-long", SamplingParams(max_tokens=1000, ignore_eos=True),
                                                prompt="a long one", attempt=1))
        while long.next_seq == 1 and not long.done:
            time.sleep(0.01)
        arriving[0] = 5
        started = time.monotonic()
        quick = service.submit(GenerationRequest("gather-2", params, prompt="joins a running batch", attempt=1))
        assert quick.wait(20).error_type is None and time.monotonic() - started < 20
        service.abort("gather-long")
        assert long.wait(20).finish_reason == "abort"
    finally:
        service.stop()


def test_the_wait_for_arriving_jobs_is_bounded(tiny_model_dir):
    engine = LLMEngine(tiny_model_dir, num_kv_blocks=256)
    service = EngineService(engine, None, stats_interval=0.05, arriving=lambda: 1, gather_seconds=0.3).start()
    try:
        started = time.monotonic()
        result = service.submit(GenerationRequest("stuck-claim", SamplingParams(max_tokens=2), prompt="x")).wait(60)
        elapsed = time.monotonic() - started
        assert result.error_type is None and 0.3 <= elapsed < 30   # a claim that never ends delays, not blocks
    finally:
        service.stop()


def test_starts_cold_only_when_no_stream_is_in_flight(tiny_model_dir):
    engine = LLMEngine(tiny_model_dir, num_kv_blocks=256)
    assert not engine.starts_cold()                       # nothing to start
    engine.add_request("cold-0", "a prompt", SamplingParams(max_tokens=50, ignore_eos=True))
    assert engine.starts_cold()
    engine.step()                                         # prefilled: running, its first token out
    assert not engine.starts_cold()
    seq = engine.scheduler.running.pop()
    engine.scheduler._preempt(seq)                        # as a KV cache shortage would
    assert not engine.starts_cold()                       # waiting again, but its stream wants its next token
    engine.abort_request("cold-0")
    engine.step()
    assert not engine.has_unfinished_requests()

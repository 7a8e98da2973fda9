"""The worker's engine gets every engine setting (`Settings.engine_kwargs`) and the device the
worker picked."""
from __future__ import annotations

import pytest

from app.infra.settings import Settings
from kernels import cpu_kernels
from worker.runtime import build_engine


def test_build_engine_passes_every_engine_setting(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(cpu_kernels, "_build_dir", None)   # restored after the test
    settings = Settings(home=str(tmp_path), model=str(tiny_model_dir), device="cpu", block_size=8, num_kv_blocks=48,
                        max_num_seqs=4, max_num_batched_tokens=96, max_model_len=100, enable_prefix_caching=False,
                        seed=7, kv_cache_bytes=1 << 20, tp_timeout_seconds=12.5, cache_dir=str(tmp_path / "cache"))
    engine = build_engine(settings)
    assert {name: getattr(engine.config, name) for name in settings.engine_kwargs()} == settings.engine_kwargs()
    assert engine.config.device == "cpu" and engine.max_model_len == 100
    assert engine.config.max_prompt_tokens_per_step == settings.prompt_tokens_per_step("cpu") == 128
    assert cpu_kernels._cache_dir() == tmp_path / "cache" / "kernels"


def test_the_service_and_the_engine_default_the_same():
    """The engine's defaults live in EngineConfig; the settings (which the API reads too, and which
    cannot import the engine) repeat them: they must agree."""
    import dataclasses

    from worker.engine.config import EngineConfig

    engine_defaults = {f.name: f.default for f in dataclasses.fields(EngineConfig)}
    # (without the newcomer reserve, which the service adds to the engine's max_num_seqs)
    service_defaults = Settings(home="unused", fair_reserve_seqs=0).engine_kwargs()
    assert service_defaults == {name: engine_defaults[name] for name in service_defaults}


def test_a_built_engine_is_warm_and_empty(tiny_model_dir, tmp_path, monkeypatch):
    """build_engine runs one short generation (the worker reports healthy only after it) and hands
    over an engine with no request left in it and every KV block free again."""
    monkeypatch.setattr(cpu_kernels, "_build_dir", None)
    settings = Settings(home=str(tmp_path), model=str(tiny_model_dir), device="cpu", block_size=8, num_kv_blocks=48,
                        enable_prefix_caching=False, cache_dir=str(tmp_path / "cache"))
    steps = []
    from worker.engine import LLMEngine

    original = LLMEngine.step
    monkeypatch.setattr(LLMEngine, "step", lambda self: steps.append(1) or original(self))
    engine = build_engine(settings)
    assert len(steps) >= 4                      # a prefill and decode steps ran before the engine was returned
    assert not engine.has_unfinished_requests() and engine.requests == {}
    assert engine.kv.pool.num_free == engine.kv.pool.num_blocks


def test_the_engine_is_loaded_in_a_thread_that_ends(tiny_model_dir, tmp_path, monkeypatch):
    """Loading and warming up run in a short-lived thread, not the caller's: the caller (the worker's
    main thread) then holds no OpenMP pool, and the engine loop's pool is the process's only one
    (worker/runtime.py build_engine says why that matters). A failure there is raised in the caller."""
    import threading

    from worker.engine import LLMEngine

    monkeypatch.setattr(cpu_kernels, "_build_dir", None)
    settings = Settings(home=str(tmp_path), model=str(tiny_model_dir), device="cpu", num_kv_blocks=48,
                        cache_dir=str(tmp_path / "cache"))
    threads = []
    original = LLMEngine.step
    monkeypatch.setattr(LLMEngine, "step", lambda self: threads.append(threading.current_thread()) or original(self))
    build_engine(settings)
    assert threads and {t.name for t in threads} == {"genq-engine-build"}
    assert threading.current_thread() not in threads and not threads[0].is_alive()

    monkeypatch.setattr(LLMEngine, "step", lambda self: (_ for _ in ()).throw(RuntimeError("warm-up broke")))
    with pytest.raises(RuntimeError, match="warm-up broke"):
        build_engine(settings)

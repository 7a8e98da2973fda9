"""The engine is configured by its arguments alone (EngineConfig), never by the environment: an
unknown keyword is a clear TypeError, and the cache directory and the tensor-parallel timeout come
from the config."""
from __future__ import annotations

import shutil

import pytest

from kernels import cpu_kernels
from worker.engine import LLMEngine, loader
from worker.engine.config import DEFAULT_CPU_KV_CACHE_BYTES, EngineConfig


def test_an_unknown_keyword_names_itself_and_the_accepted_ones(tiny_model):
    with pytest.raises(TypeError) as info:
        LLMEngine(model=tiny_model, block_sise=8, num_kv_blocks=64)
    message = str(info.value)
    assert "unknown engine argument(s): block_sise;" in message
    assert "block_size" in message and "cache_dir" in message and "tp_timeout_seconds" in message
    with pytest.raises(TypeError, match="unknown engine argument\\(s\\): colour, flavour;"):
        EngineConfig.from_kwargs(flavour=1, colour=2)


def test_the_config_ignores_the_environment(monkeypatch, tiny_model):
    monkeypatch.setenv("GENQ_KV_CACHE_BYTES", "1")
    monkeypatch.setenv("GENQ_TP_TIMEOUT_SECONDS", "1")
    monkeypatch.setenv("GENQ_MODEL", "/nowhere")
    config = EngineConfig()
    assert config.kv_cache_bytes == DEFAULT_CPU_KV_CACHE_BYTES and config.tp_timeout_seconds == 300.0
    assert config.cache_dir is None
    monkeypatch.setattr(loader, "default_model_path", lambda: tiny_model)
    assert loader.resolve_model(None) == tiny_model
    with pytest.raises(ValueError, match="tp_timeout_seconds must be > 0"):
        EngineConfig(tp_timeout_seconds=0)


def test_the_cache_defaults_to_home(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("GENQ_CACHE_DIR", str(tmp_path / "ignored"))
    assert loader.cache_root() == tmp_path / ".cache" / "genq"
    assert loader.cache_root("~/elsewhere") == tmp_path / "elsewhere"


def test_the_engine_uses_its_cache_dir_for_models_and_kernels(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr(cpu_kernels, "_build_dir", None)   # restored after the test
    monkeypatch.setenv("GENQ_CACHE_DIR", str(tmp_path / "ignored"))
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"not read: its converted copy is in the cache already")
    stat = gguf.stat()
    cache = tmp_path / "cache"
    converted = cache / "gguf" / f"tiny-{stat.st_size}-{stat.st_mtime_ns}"
    shutil.copytree(tiny_model, converted)

    engine = LLMEngine(model=gguf, num_kv_blocks=32, cache_dir=str(cache))
    assert engine.config.cache_dir == str(cache) and engine.model_name == "tiny"
    assert loader.hf_dir_for(gguf, cache) == converted
    assert cpu_kernels._cache_dir() == cache / "kernels"
    assert not (tmp_path / "ignored").exists()

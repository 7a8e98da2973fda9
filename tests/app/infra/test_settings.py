"""The settings' field table: every field's variable reads, writes back and round-trips; errors name
the variable; `engine_kwargs` and `given_in_env` follow the same table."""
from __future__ import annotations

from dataclasses import fields

import pytest

from app.infra.settings import BOOL, FLOAT, FLOATS, INT, STR, VERBATIM, Settings, env_var_names, given_in_env
from app.infra.webhook_secrets import generate_secret

# A valid value other than the default, as environment text, for each kind of variable.
SAMPLES = {INT: "7", FLOAT: "2.5", STR: "text", VERBATIM: "verbatim", FLOATS: "0,1.5,30"}
# Fields whose checks need a particular value.
SPECIAL = {"log_level": "DEBUG", "log_format": "json", "webhook_retry_jitter": "0.5", "scheduling": "fifo",
           "fair_light_allowance": "0.5"}

ENGINE_FIELDS = {"model", "dtype", "block_size", "num_kv_blocks", "max_num_seqs", "max_num_batched_tokens",
                 "max_model_len", "enable_prefix_caching", "seed", "kv_cache_bytes", "tensor_parallel_size",
                 "cache_dir", "tp_timeout_seconds", "scheduling", "fair_step_share",
                 "fair_light_allowance"}


def _sample(f) -> str:
    kind = f.metadata["kind"]
    if f.name == "webhook_secret":
        return generate_secret()
    if kind is BOOL:
        return "0" if f.default else "1"
    return SPECIAL.get(f.name, SAMPLES[kind])


def test_every_variable_is_read_and_written_back():
    env = {f.metadata["env"]: _sample(f) for f in fields(Settings)}
    settings = Settings.from_env(env)
    unread = [f.name for f in fields(Settings) if getattr(settings, f.name) == f.default]
    assert unread == []
    assert settings.to_env() == env
    assert Settings.from_env(settings.to_env()) == settings


def test_defaults_and_derived_values_round_trip(tmp_path):
    settings = Settings.from_env({"GENQ_HOME": str(tmp_path), "GENQ_MODEL": "/models/Qwen2.5-0.5B.gguf"})
    assert settings.database_url == f"sqlite:///{tmp_path / 'genq.db'}"
    assert settings.model_name == "Qwen2.5-0.5B" and settings.worker_concurrency == settings.max_num_seqs
    assert settings.api_url == "http://127.0.0.1:8000"
    assert Settings.from_env(settings.to_env()) == settings


def test_float_lists_round_trip_without_rounding():
    settings = Settings(webhook_retry_schedule=(0.1234567, 5.0, 1e7))
    assert settings.to_env()["GENQ_WEBHOOK_RETRY_SCHEDULE"] == "0.1234567,5,1e+07"
    assert Settings.from_env(settings.to_env()) == settings


def test_env_var_names_are_the_field_table():
    names = env_var_names()
    assert names == sorted({f.metadata["env"] for f in fields(Settings)})
    assert len(names) == len(fields(Settings))   # one variable per field, none shared
    assert {"DATABASE_URL", "REDIS_URL", "GENQ_BLOCK_SIZE", "GENQ_REDIS_PREFIX"} <= set(names)


@pytest.mark.parametrize("name,raw,message", [
    ("GENQ_BLOCK_SIZE", "abc", "environment variable GENQ_BLOCK_SIZE must be an integer, got 'abc'"),
    ("GENQ_NUM_KV_BLOCKS", "1.5", "environment variable GENQ_NUM_KV_BLOCKS must be an integer, got '1.5'"),
    ("GENQ_LEASE_SECONDS", "soon", "environment variable GENQ_LEASE_SECONDS must be a number, got 'soon'"),
    ("GENQ_CELERY_EVENTS", "maybe",
     "environment variable GENQ_CELERY_EVENTS must be a boolean (1/0, true/false), got 'maybe'"),
    ("GENQ_WEBHOOK_RETRY_SCHEDULE", "1,x",
     "environment variable GENQ_WEBHOOK_RETRY_SCHEDULE must be comma-separated numbers, got '1,x'"),
])
def test_a_bad_value_names_its_variable(name, raw, message):
    with pytest.raises(ValueError) as info:
        Settings.from_env({name: raw})
    assert str(info.value) == message


def test_the_checks_still_apply_to_values_from_the_environment():
    with pytest.raises(ValueError, match="setting block_size must be > 0, got 0"):
        Settings.from_env({"GENQ_BLOCK_SIZE": "0"})
    with pytest.raises(ValueError, match="setting api_port must be a TCP port"):
        Settings.from_env({"GENQ_API_PORT": "70000"})


def test_empty_means_unset_except_for_verbatim_strings():
    settings = Settings.from_env({"GENQ_SEED": "", "GENQ_API_KEY": "", "GENQ_LOG_LEVEL": "", "GENQ_QUEUE": ""})
    assert (settings.seed, settings.api_key, settings.log_level, settings.queue) == (0, None, "INFO", "")


def test_engine_kwargs_are_the_flagged_fields():
    settings = Settings(model="/m", num_kv_blocks=64, cache_dir="/cache", tp_timeout_seconds=30.0)
    kwargs = settings.engine_kwargs()
    assert set(kwargs) == ENGINE_FIELDS   # device: the worker picks it (worker/devices.py)
    assert kwargs["model"] == "/m" and kwargs["num_kv_blocks"] == 64
    assert kwargs["cache_dir"] == "/cache" and kwargs["tp_timeout_seconds"] == 30.0


def test_fair_scheduling_adds_the_newcomer_reserve_to_the_engines_batch():
    fair = Settings(max_num_seqs=64)
    assert (fair.fair_reserve_seqs, fair.newcomer_reserve, fair.worker_concurrency) == (8, 8, 64)
    assert fair.engine_kwargs()["max_num_seqs"] == 72           # the Celery threads fill 64 of them
    assert Settings(max_num_seqs=4).newcomer_reserve == 1
    assert Settings(max_num_seqs=64, fair_reserve_seqs=0).engine_kwargs()["max_num_seqs"] == 64
    fifo = Settings(max_num_seqs=64, scheduling="fifo")
    assert fifo.newcomer_reserve == 0 and fifo.engine_kwargs()["max_num_seqs"] == 64   # as before
    with pytest.raises(ValueError, match="fair_reserve_seqs"):
        Settings(fair_reserve_seqs=-1)


def test_prompt_tokens_per_step_by_device_unless_set():
    from app.infra.settings import CPU_PROMPT_TOKENS_PER_STEP

    auto = Settings()
    assert auto.prompt_tokens_per_step("cpu") == CPU_PROMPT_TOKENS_PER_STEP
    assert auto.prompt_tokens_per_step("cuda:0") is None          # a GPU's steps are short: no limit
    set_ = Settings.from_env({"GENQ_MAX_PROMPT_TOKENS_PER_STEP": "64"})
    assert set_.prompt_tokens_per_step("cpu") == set_.prompt_tokens_per_step("cuda:0") == 64
    assert Settings(max_prompt_tokens_per_step=0).prompt_tokens_per_step("cpu") is None
    with pytest.raises(ValueError, match="max_prompt_tokens_per_step"):
        Settings(max_prompt_tokens_per_step=-1)


def test_given_in_env_is_whether_the_variable_is_there():
    """`genq up` allows private webhook targets unless the environment names the variable at all
    (even empty: then the setting reads as its default, False), as it always did."""
    assert given_in_env("webhook_allow_private", {"GENQ_WEBHOOK_ALLOW_PRIVATE": "0"})
    assert not given_in_env("webhook_allow_private", {})
    assert given_in_env("webhook_allow_private", {"GENQ_WEBHOOK_ALLOW_PRIVATE": ""})
    assert given_in_env("home", {"GENQ_HOME": ""})
    assert given_in_env("key_prefix", {"GENQ_REDIS_PREFIX": "x"})


def test_local_development_allows_private_webhooks_unless_the_environment_says(tmp_path):
    from app.cli.service import for_local_development

    settings = Settings(home=str(tmp_path), webhook_secret=generate_secret())
    assert for_local_development(settings, {})[0].webhook_allow_private is True
    kept, _ = for_local_development(settings, {"GENQ_WEBHOOK_ALLOW_PRIVATE": "0"})
    assert kept.webhook_allow_private is False


def test_a_blank_retry_schedule_is_the_default():
    assert Settings.from_env({"GENQ_WEBHOOK_RETRY_SCHEDULE": "  "}).webhook_retry_schedule == \
        Settings().webhook_retry_schedule

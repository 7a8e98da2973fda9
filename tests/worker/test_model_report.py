"""A started worker tells the API its model's tokenizer and context length (Redis, under the served
model name), and writes the report again when Redis lost it."""
from __future__ import annotations

import time

from tokenizers import Tokenizer

from app.infra.model_reports import read_model
from worker.runtime import WorkerRuntime


def test_a_started_worker_reports_its_tokenizer_and_max_model_len(settings, engine):
    quick = settings.with_(lease_seconds=0.6)   # heartbeat every 0.2 s
    key = None
    runtime = WorkerRuntime(quick, engine=engine).start()
    try:
        key = runtime.channels.model_report(quick.model_name)
        report = read_model(runtime.redis, runtime.channels, quick.model_name)
        assert report is not None and report.model == quick.model_name
        assert report.max_model_len == engine.max_model_len
        tokenizer = Tokenizer.from_str(report.tokenizer_json)
        text = "Once upon a time, word1 says something 🙂"
        assert tokenizer.encode(text, add_special_tokens=False).ids == \
            engine.tokenizer.encode(text, add_special_tokens=False)

        runtime.redis.delete(key)                # Redis restarted without persistence
        deadline = time.monotonic() + 10
        while not runtime.redis.exists(key) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert read_model(runtime.redis, runtime.channels, quick.model_name) == report
    finally:
        runtime.stop()
        if key is not None:
            runtime.redis.delete(key)

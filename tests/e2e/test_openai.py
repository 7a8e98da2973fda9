"""The OpenAI-compatible API end to end, with the official `openai` client: chat and completions
(streamed and not), the Batch API (files, batches, cancel) and interactive latency under a batch.
API over real HTTP + a real `genq worker` process (tiny model) + Redis + the database."""
from __future__ import annotations

import io
import json
import re
import statistics
import threading
import time
import typing

import openai
import pydantic
import pytest
import requests

from app.infra.db import session_factory
from app.jobs.models import Job
from tests.support.service import ServerThread, WorkerProcess, service_settings

pytestmark = pytest.mark.timeout(300)

CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three colors."}]


@pytest.fixture(scope="module")
def genq(tmp_path_factory, tiny_model_dir):
    """(settings, base URL, openai client) for a whole service with the tiny model."""
    from app.api import create_app

    tmp = tmp_path_factory.mktemp("openai")
    with service_settings(tmp, model=str(tiny_model_dir), max_num_seqs=64, lease_seconds=30) as settings, \
            WorkerProcess(settings, tmp / "worker.log"), ServerThread(create_app(settings)) as server:
        key = getattr(server, "api_key", None) or "no-key-needed"
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, timeout=120, max_retries=0)
        yield settings, server.url, client


@pytest.fixture(scope="module")
def offline(tiny_model_dir):
    from worker.engine import LLMEngine

    return LLMEngine(str(tiny_model_dir), num_kv_blocks=256, max_num_seqs=4)


def test_models(genq):
    settings, _, client = genq
    assert [m.id for m in client.models.list().data] == [settings.model_name]


def test_chat_stream_joins_to_the_plain_answer_and_usage_is_right(genq, offline):
    settings, url, client = genq
    kwargs = dict(model=settings.model_name, messages=CHAT, max_tokens=12, temperature=0)
    plain = client.chat.completions.create(**kwargs)
    choice = plain.choices[0]
    assert plain.object == "chat.completion" and plain.model == settings.model_name
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    prompt_tokens = len(offline.apply_chat_template(CHAT))
    assert plain.usage.prompt_tokens == prompt_tokens
    assert 1 <= plain.usage.completion_tokens <= 12
    assert plain.usage.total_tokens == prompt_tokens + plain.usage.completion_tokens

    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [choice.finish_reason]
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == \
        (plain.usage.prompt_tokens, plain.usage.completion_tokens, plain.usage.total_tokens)
    assert usage.prompt_tokens_details.cached_tokens > 0   # the second request reused the prompt's blocks
    assert all(c.id == chunks[0].id and c.object == "chat.completion.chunk" for c in chunks)

    # every request is a job
    job_id = plain.id.removeprefix("chatcmpl-")
    job = requests.get(f"{url}/v1/jobs/{job_id}", timeout=30).json()
    assert job["status"] == "succeeded" and job["priority"] == 0 and job["output"]["text"] == choice.message.content


def test_completion_stream_and_plain_agree(genq, offline):
    settings, _, client = genq
    kwargs = dict(model=settings.model_name, prompt="The capital of France is", max_tokens=10, temperature=0,
                  extra_body={"ignore_eos": True})
    plain = client.completions.create(**kwargs)
    assert plain.object == "text_completion" and plain.choices[0].finish_reason == "length"
    assert plain.usage.completion_tokens == 10
    assert plain.usage.prompt_tokens == len(offline.encode("The capital of France is"))
    streamed = list(client.completions.create(**kwargs, stream=True))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == plain.choices[0].text


def test_n_stop_seed_penalties_logprobs(genq):
    settings, url, client = genq
    two = client.chat.completions.create(model=settings.model_name, messages=CHAT, max_tokens=8, n=2, seed=7,
                                         temperature=1.0, top_p=0.9, presence_penalty=0.5, frequency_penalty=0.5,
                                         user="u-1", extra_body={"ignore_eos": True})
    assert sorted(c.index for c in two.choices) == [0, 1]
    assert two.usage.completion_tokens == 16
    again = client.chat.completions.create(model=settings.model_name, messages=CHAT, max_tokens=8, n=2, seed=7,
                                           temperature=1.0, top_p=0.9, presence_penalty=0.5, frequency_penalty=0.5,
                                           extra_body={"ignore_eos": True})
    assert [c.message.content for c in again.choices] == [c.message.content for c in two.choices]

    job = requests.post(f"{url}/v1/jobs", json={"messages": CHAT, "max_tokens": 4, "n": 2, "seed": 7, "logprobs": 1},
                        headers={"Authorization": f"Bearer {client.api_key}", "Prefer": "wait=60"}, timeout=90).json()
    assert [c["index"] for c in job["output"]["choices"]] == [0, 1] and job["output"]["text"] == \
        job["output"]["choices"][0]["text"] and len(job["output"]["choices"][1]["logprobs"]) == \
        job["output"]["choices"][1]["completion_tokens"]

    streamed = list(client.chat.completions.create(model=settings.model_name, messages=CHAT, max_tokens=6, n=2,
                                                   seed=3, stream=True))
    assert {c.choices[0].index for c in streamed if c.choices} == {0, 1}

    lp = client.chat.completions.create(model=settings.model_name, messages=CHAT, max_tokens=5, temperature=0,
                                        logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    content = lp.choices[0].logprobs.content
    assert len(content) == 5 and all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)
    assert all(t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob for t in content)

    text = client.completions.create(model=settings.model_name, prompt="one two", max_tokens=4, temperature=0,
                                     logprobs=3, extra_body={"ignore_eos": True})
    assert len(text.choices[0].logprobs.tokens) == 4 and all(len(t) <= 3 for t in text.choices[0].logprobs.top_logprobs)

    # Streamed, the same greedy tokens carry the same log-probabilities, chunk by chunk.
    chunks = list(client.chat.completions.create(model=settings.model_name, messages=CHAT, max_tokens=5,
                                                 temperature=0, logprobs=True, top_logprobs=2, stream=True,
                                                 extra_body={"ignore_eos": True}))
    streamed_lp = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [t.token for t in streamed_lp] == [t.token for t in content]
    assert [round(t.logprob, 4) for t in streamed_lp] == [round(t.logprob, 4) for t in content]
    assert all(len(t.top_logprobs) == 2 for t in streamed_lp)
    text_chunks = list(client.completions.create(model=settings.model_name, prompt="one two", max_tokens=4,
                                                 temperature=0, logprobs=3, stream=True,
                                                 extra_body={"ignore_eos": True}))
    tokens = [tok for c in text_chunks if c.choices and c.choices[0].logprobs for tok in c.choices[0].logprobs.tokens]
    offsets = [o for c in text_chunks if c.choices and c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset]
    assert tokens == text.choices[0].logprobs.tokens and offsets == text.choices[0].logprobs.text_offset

    first = client.completions.create(model=settings.model_name, prompt="one two", max_tokens=12, temperature=0)
    if len(first.choices[0].text) > 3:
        stop = first.choices[0].text[2:4]
        stopped = client.completions.create(model=settings.model_name, prompt="one two", max_tokens=12,
                                            temperature=0, stop=[stop])
        assert stop not in stopped.choices[0].text and stopped.choices[0].finish_reason == "stop"


def test_a_stream_whose_client_hangs_up_cancels_its_job(genq):
    settings, url, client = genq
    headers = {"Authorization": f"Bearer {client.api_key}"}
    body = {"model": settings.model_name, "prompt": "on and on", "max_tokens": 1500, "ignore_eos": True,
            "stream": True}
    with requests.post(f"{url}/v1/completions", json=body, headers=headers, stream=True, timeout=60) as response:
        lines = response.iter_lines()
        first = next(line for line in lines if line.startswith(b"data: "))
    job_id = json.loads(first[6:])["id"].removeprefix("cmpl-")
    deadline = time.monotonic() + 60
    while (job := requests.get(f"{url}/v1/jobs/{job_id}", headers=headers, timeout=30).json())["status"] != "canceled":
        assert time.monotonic() < deadline, job["status"]
        time.sleep(0.2)
    assert job["usage"]["completion_tokens"] < 1500


def test_errors_are_in_openai_shape(genq):
    settings, url, client = genq
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="no-such-model", messages=CHAT)
    assert missing.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=settings.model_name, messages=CHAT, temperature=-1)
    assert bad.value.body["param"] == "temperature" and bad.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as too_long:
        client.completions.create(model=settings.model_name, prompt="lorem ipsum " * 3000, max_tokens=16)
    assert too_long.value.body["code"] == "context_length_exceeded"
    headers = {"Authorization": f"Bearer {client.api_key}"}
    raw = requests.post(f"{url}/v1/chat/completions", json={"model": settings.model_name}, headers=headers,
                        timeout=30)
    assert raw.status_code == 400 and set(raw.json()["error"]) == {"message", "type", "param", "code"}
    with pytest.raises(openai.BadRequestError) as tier:
        client.chat.completions.create(model=settings.model_name, messages=CHAT, service_tier="scale")
    assert tier.value.body["param"] == "service_tier"


def test_service_tier_flex_is_the_lower_lane_and_is_echoed(genq):
    settings, url, client = genq
    flex = client.chat.completions.create(model=settings.model_name, messages=CHAT, max_tokens=4, service_tier="flex")
    plain = client.chat.completions.create(model=settings.model_name, messages=CHAT, max_tokens=4)
    assert (flex.service_tier, plain.service_tier) == ("flex", "default")
    job = requests.get(f"{url}/v1/jobs/{flex.id.removeprefix('chatcmpl-')}",
                       headers={"Authorization": f"Bearer {client.api_key}"}, timeout=10).json()
    assert job["service_tier"] == "flex"


def _batch_file(client, lines) -> str:
    data = "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines).encode()
    return client.files.create(file=("input.jsonl", io.BytesIO(data)), purpose="batch").id


def _chat_line(model, i, max_tokens, **body):
    return {"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": model, "messages": [{"role": "user", "content": f"Count to {i}"}],
                     "max_tokens": max_tokens, "temperature": 0, **body}}


def _wait(client, batch_id, statuses, timeout=240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = client.batches.retrieve(batch_id)
        if batch.status in statuses:
            return batch
        time.sleep(0.3)
    raise AssertionError(f"batch {batch_id} stayed {batch.status}")


def _jsonl(client, file_id):
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines()]


class LinesInFlight:
    """Samples, from the database in a thread, how many lines of a batch are released and not
    finished (queued or running) and how many are running; keeps the largest of each."""

    def __init__(self, settings, batch_id: str):

        self.sessions, self.batch_id = session_factory(settings.database_url), batch_id
        self.max_in_flight = self.max_running = self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "LinesInFlight":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        from sqlalchemy import select

        while not self._stop.is_set():
            with self.sessions() as session:
                rows = session.execute(select(Job.status, Job.released_at).where(
                    Job.batch_id == self.batch_id, Job.status.in_(("queued", "running")))).all()
            self.max_in_flight = max(self.max_in_flight, sum(1 for _, released in rows if released is not None))
            self.max_running = max(self.max_running, sum(1 for status, _ in rows if status == "running"))
            self.samples += 1
            time.sleep(0.02)


def test_batch_of_100_with_3_invalid_lines(genq):
    settings, url, client = genq
    model = settings.model_name
    lines = [_chat_line(model, i, 3) for i in range(100)]
    lines[10] = {**lines[10], "url": "/v1/embeddings"}
    lines[50] = {**lines[50], "body": {"model": model, "max_tokens": 3}}                # no messages
    lines[90] = {**lines[90], "body": {**lines[90]["body"], "temperature": -1}}         # out of range
    file_id = _batch_file(client, lines)
    assert client.files.retrieve(file_id).purpose == "batch"
    batch = client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h",
                                  metadata={"run": "e2e"})
    assert batch.status in ("validating", "in_progress") and batch.metadata == {"run": "e2e"}
    with LinesInFlight(settings, batch.id) as watch:
        batch = _wait(client, batch.id, {"completed", "failed"})
    assert batch.status == "completed", batch
    # never more than the cap of lines queued or running at once, and the cap was reached
    assert watch.samples > 10 and watch.max_in_flight == settings.batch_max_in_flight == 8
    assert watch.max_running <= settings.batch_max_in_flight
    assert batch.request_counts.model_dump() == {"total": 100, "completed": 97, "failed": 3}
    results, errors = _jsonl(client, batch.output_file_id), _jsonl(client, batch.error_file_id)
    assert sorted(r["custom_id"] for r in results) == sorted(f"req-{i}" for i in range(100) if i not in (10, 50, 90))
    assert sorted(e["custom_id"] for e in errors) == ["req-10", "req-50", "req-90"]
    for result in results:
        body = result["response"]["body"]
        assert result["response"]["status_code"] == 200 and result["error"] is None
        assert body["object"] == "chat.completion" and body["usage"]["completion_tokens"] <= 3
    assert all(e["error"]["code"] and e["error"]["message"] for e in errors)
    assert batch.id in [b.id for b in client.batches.list(limit=100).data]
    for result in results:   # each result is the answer to its own line's request
        job = requests.get(f"{url}/v1/jobs/{result['response']['request_id']}", timeout=30).json()
        number = result["custom_id"].removeprefix("req-")
        assert job["input"]["messages"] == [{"role": "user", "content": f"Count to {number}"}]
        assert result["response"]["body"]["choices"][0]["message"]["content"] == job["output"]["text"]


def test_a_line_that_fails_or_is_canceled_releases_the_next(genq):
    """More failing and canceled lines than the cap: had any of them not released the next line,
    the batch would stall with lines held. Failures come from the worker (prompts over the model's
    context); cancels through the job API, of lines queued (the API releases) or running (the
    worker does)."""
    from sqlalchemy import select

    settings, url, client = genq
    model, cap = settings.model_name, settings.batch_max_in_flight
    too_long = [{"custom_id": f"long-{i}", "method": "POST", "url": "/v1/completions",
                 "body": {"model": model, "prompt": "lorem ipsum " * 3000, "max_tokens": 4}} for i in range(cap + 2)]
    endless = [{"custom_id": f"endless-{i}", "method": "POST", "url": "/v1/completions",
                "body": {"model": model, "prompt": f"on and on {i}", "max_tokens": 1500, "ignore_eos": True}}
               for i in range(cap + 2)]
    file_id = _batch_file(client, [line for pair in zip(too_long, endless) for line in pair])
    batch = client.batches.create(input_file_id=file_id, endpoint="/v1/completions", completion_window="24h")
    sessions = session_factory(settings.database_url)
    canceled: set[str] = set()
    deadline = time.monotonic() + 180
    with LinesInFlight(settings, batch.id) as watch:
        while (batch := client.batches.retrieve(batch.id)).status not in ("completed", "failed"):
            assert time.monotonic() < deadline, batch
            with sessions() as session:
                released = session.scalars(select(Job.id).where(
                    Job.batch_id == batch.id, Job.released_at.is_not(None), Job.custom_id.like("endless-%"),
                    Job.status.in_(("queued", "running")))).all()
            for job_id in set(released) - canceled:
                assert requests.post(f"{url}/v1/jobs/{job_id}/cancel", timeout=30).status_code in (200, 202, 409)
                canceled.add(job_id)
            time.sleep(0.2)
    assert batch.status == "completed" and watch.max_in_flight <= cap
    assert batch.request_counts.model_dump() == {"total": 2 * cap + 4, "completed": 0, "failed": cap + 2}
    errors = {e["custom_id"]: e for e in _jsonl(client, batch.error_file_id)}
    assert sorted(errors) == sorted(line["custom_id"] for line in too_long + endless)
    assert {errors[line["custom_id"]]["response"]["status_code"] for line in too_long} == {400}
    assert {errors[line["custom_id"]]["error"]["code"] for line in endless} == {"batch_cancelled"}


def test_batch_cancel(genq):
    settings, url, client = genq
    # 512 tokens a line: enough work that the batch is still running when the cancel arrives, however
    # fast the engine (at 64 a line it could finish first on a fast CPU)
    file_id = _batch_file(client, [_chat_line(settings.model_name, i, 512, ignore_eos=True) for i in range(120)])
    batch = client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")
    _wait(client, batch.id, {"in_progress"}, timeout=60)
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled")
    batch = _wait(client, batch.id, {"cancelled"}, timeout=120)
    counts = batch.request_counts
    assert counts.total == 120 and counts.completed < 120 and counts.failed == 0
    errors = _jsonl(client, batch.error_file_id)
    assert len(errors) == 120 - counts.completed
    assert {e["error"]["code"] for e in errors} == {"batch_cancelled"}
    jobs = requests.get(f"{url}/v1/jobs?status=canceled&limit=100",
                        headers={"Authorization": f"Bearer {client.api_key}"}, timeout=30).json()["data"]
    assert jobs and all(job["priority"] == 9 for job in jobs)


def _time_to_first_token(client, model) -> tuple[float, str]:
    start = time.perf_counter()
    first, text = None, ""
    for chunk in client.chat.completions.create(model=model, messages=CHAT, max_tokens=8, temperature=0,
                                                stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter() - start
            text += chunk.choices[0].delta.content
    return first, text


def test_interactive_request_keeps_its_latency_while_a_batch_runs(genq):
    """The issue's goal is within 2x of idle; measured and printed (median of 3 each), asserted only
    as "it completes while the batch is still running" (benchmarks/batch_latency.py compares caps)."""
    settings, _, client = genq
    model = settings.model_name
    idle = statistics.median(_time_to_first_token(client, model)[0] for _ in range(3))
    file_id = _batch_file(client, [_chat_line(model, i, 48, ignore_eos=True) for i in range(200)])
    batch = client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")
    running = _wait(client, batch.id, {"in_progress"}, timeout=60)
    deadline = time.monotonic() + 60
    while running.request_counts.completed == 0 and time.monotonic() < deadline:   # the batch is generating
        time.sleep(0.1)
        running = client.batches.retrieve(batch.id)
    samples = [_time_to_first_token(client, model) for _ in range(3)]
    busy = statistics.median(first for first, _ in samples)
    during = client.batches.retrieve(batch.id)
    print(f"\ntime to first token: idle {idle * 1000:.0f} ms, during a 200-line batch {busy * 1000:.0f} ms "
          f"({busy / idle:.2f}x; GENQ_BATCH_MAX_IN_FLIGHT={settings.batch_max_in_flight}); "
          f"batch {during.request_counts.completed}/200 done when the requests finished")
    assert all(text for _, text in samples)
    assert during.status == "in_progress" and during.request_counts.completed < 200
    client.batches.cancel(batch.id)
    _wait(client, batch.id, {"cancelled", "completed"}, timeout=120)


def test_cli_batch_writes_results_and_errors(genq, tmp_path):
    import os
    import subprocess
    import sys

    settings, url, client = genq
    lines = [_chat_line(settings.model_name, i, 3) for i in range(5)] + ["{not json"]
    source = tmp_path / "input.jsonl"
    source.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    output = tmp_path / "output.jsonl"
    env = {**os.environ, "GENQ_API_KEY": client.api_key}
    done = subprocess.run([sys.executable, "-m", "app.cli", "batch", str(source), "-o", str(output), "--url", url],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "5/6" in done.stderr or "6/6" in done.stderr
    results = [json.loads(line) for line in output.read_text().splitlines()]
    assert sorted(r["custom_id"] for r in results) == [f"req-{i}" for i in range(5)]
    errors = [json.loads(line) for line in (tmp_path / "output.errors.jsonl").read_text().splitlines()]
    assert [e["error"]["code"] for e in errors] == ["invalid_json_line"]


# -- structured outputs -------------------------------------------------------------------------------
# The tiny model is random: whatever it "wants", the engine's grammar masks leave it only tokens that
# keep the output inside the constraint, and EOS only once the output is complete.

class Verdict(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    answer: typing.Literal["yes", "no", "unsure"]
    confidence: typing.Annotated[int, pydantic.Field(ge=0, le=9)]


def test_the_sdk_parse_helper_gets_a_validated_object(genq):
    settings, _, client = genq
    for seed in range(4):
        completion = client.chat.completions.parse(model=settings.model_name, messages=CHAT, response_format=Verdict,
                                                   max_tokens=40, temperature=1.0, seed=seed)
        choice = completion.choices[0]
        assert choice.finish_reason == "stop", choice
        assert isinstance(choice.message.parsed, Verdict)
        assert Verdict.model_validate_json(choice.message.content) == choice.message.parsed


def test_json_object_regex_and_choice_on_both_endpoints(genq):
    settings, url, client = genq
    plain = client.chat.completions.create(model=settings.model_name, messages=CHAT, max_tokens=60, temperature=0,
                                           response_format={"type": "json_object"})
    if plain.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(plain.choices[0].message.content), dict)
    regex = requests.post(f"{url}/v1/completions", json={
        "model": settings.model_name, "prompt": "Phone:", "max_tokens": 20, "temperature": 1.0, "seed": 3,
        "response_format": {"type": "regex", "pattern": r"[0-9]{3}-[0-9]{4}"}}, timeout=120).json()
    assert re.fullmatch(r"[0-9]{3}-[0-9]{4}", regex["choices"][0]["text"]), regex
    choice = client.completions.create(model=settings.model_name, prompt="Pick:", max_tokens=10, temperature=1.0,
                                       extra_body={"response_format": {"type": "choice",
                                                                       "choices": ["red", "green", "blue"]}})
    assert choice.choices[0].text in ("red", "green", "blue") and choice.choices[0].finish_reason == "stop"


def test_a_batch_carries_the_schema_per_line(genq):
    settings, _, client = genq
    schema = {"name": "verdict", "schema": Verdict.model_json_schema(), "strict": True}
    lines = [_chat_line(settings.model_name, i, 40, temperature=1.0, seed=i,
                        response_format={"type": "json_schema", "json_schema": schema}) for i in range(12)]
    lines[5]["body"].pop("response_format")                     # a free-text line in the same batch
    batch = client.batches.create(input_file_id=_batch_file(client, lines), endpoint="/v1/chat/completions",
                                  completion_window="24h")
    batch = _wait(client, batch.id, {"completed", "failed"})
    assert batch.request_counts.model_dump() == {"total": 12, "completed": 12, "failed": 0}
    for result in _jsonl(client, batch.output_file_id):
        choice = result["response"]["body"]["choices"][0]
        if result["custom_id"] != "req-5":
            assert choice["finish_reason"] == "stop"
            Verdict.model_validate_json(choice["message"]["content"])

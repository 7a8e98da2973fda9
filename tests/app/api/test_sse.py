"""The SSE stream's guarantees, driven by hand: gaps are filled from the log, and a final job
whose log has no `done` still ends with one (built from the database)."""
from __future__ import annotations

import json
import threading
import time

import pytest
import requests

from app.api import create_app
from app.cli.client import iter_sse
from app.infra.channels import Channels
from app.infra.db import session_factory
from app.infra.redis_client import redis_client
from app.jobs import store
from app.jobs.event_log import EventId, EventLog, JobEvent
from app.jobs.models import JobStatus
from app.jobs.store import JobResult
from tests.support.service import ServerThread, service_settings


@pytest.fixture(scope="module")
def settings(tmp_path_factory):
    with service_settings(tmp_path_factory.mktemp("sse"), model_name="tiny") as settings:
        yield settings


@pytest.fixture(scope="module")
def api(settings):
    with ServerThread(create_app(settings)) as server:
        yield server.url


@pytest.fixture(scope="module")
def events(settings):
    return EventLog(redis_client(settings.redis_url), Channels(settings.key_prefix), ttl_seconds=600)


def running_job(api, settings) -> str:
    """A job submitted through the API (so the caller owns it), claimed by a pretend worker."""
    job_id = requests.post(f"{api}/v1/jobs", json={"prompt": "x"}, timeout=30).json()["id"]
    with session_factory(settings.database_url).begin() as session:
        assert store.claim_job(session, job_id, "test-worker", lease_seconds=300) is not None
    return job_id


def test_event_ids_order_across_attempts():
    assert EventId.parse("1-9") < EventId.parse("1-10") < EventId.parse("2-1")
    assert EventId(1, 9).next == EventId(1, 10) and str(EventId(3, 4)) == "3-4"
    for bad in ("", "1", "a-1", "1-", "0-0", "-1-2", "1-2-3"):
        with pytest.raises(ValueError):
            EventId.parse(bad)
    event = JobEvent(EventId(1, 2), "token", {"text": "é\n", "token_ids": [1]})
    assert JobEvent.from_message(event.to_message()) == event
    assert event.to_sse() == 'id: 1-2\nevent: token\ndata: {"text":"\\u00e9\\n","token_ids":[1]}\n\n'


def test_a_gap_in_the_live_channel_is_filled_from_the_log(api, settings, events):
    job_id = running_job(api, settings)
    received, connected = [], threading.Event()

    def listen():
        with requests.get(f"{api}/v1/jobs/{job_id}/events", stream=True, timeout=60) as response:
            connected.set()
            for event in iter_sse(response):
                received.append(event)

    thread = threading.Thread(target=listen)
    thread.start()
    connected.wait(30)
    time.sleep(0.3)   # the stream is subscribed and waiting on the channel
    log_only = events.redis.pipeline()
    for seq in (1, 2):   # written to the log but never published: the stream must still send them
        log_only.xadd(events.channels.job_events(job_id), {"type": "token", "data": json.dumps(
            {"text": f"t{seq}", "token_ids": [seq]})}, id=f"1-{seq}")
    log_only.execute()
    events.publish(job_id, [JobEvent(EventId(1, 3), "token", {"text": "t3", "token_ids": [3]}),
                            JobEvent(EventId(1, 4), "done", {"status": "succeeded"})])
    thread.join(30)
    assert [(e.id, e.event) for e in received] == [("1-1", "token"), ("1-2", "token"), ("1-3", "token"),
                                                  ("1-4", "done")]


def test_a_final_job_without_a_log_still_gets_done(api, settings):
    job_id = running_job(api, settings)
    with session_factory(settings.database_url).begin() as session:
        assert store.finish_job(session, job_id, "test-worker", 1, JobResult(
            JobStatus.SUCCEEDED, output_text="from the database", finish_reason="stop", completion_tokens=3))
    with requests.get(f"{api}/v1/jobs/{job_id}/events", stream=True, timeout=60) as response:
        received = list(iter_sse(response))
    assert [e.event for e in received] == ["done"]
    assert received[0].data["output"] == {"text": "from the database", "finish_reason": "stop"}
    with requests.get(f"{api}/v1/jobs/{job_id}/events", headers={"Last-Event-ID": received[0].id},
                      stream=True, timeout=60) as response:
        assert [e.event for e in iter_sse(response)] == ["done"]   # resuming after it: the same end

"""A small HTTP client for the job API (used by the CLI, the tests and the benchmark)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterator

import requests

FINAL = ("succeeded", "failed", "canceled")


@dataclass(frozen=True, slots=True)
class SSEEvent:
    id: str | None
    event: str
    data: Any


def iter_sse(response: requests.Response) -> Iterator[SSEEvent]:
    """Parse a text/event-stream response into events (comments skipped, data JSON-decoded)."""
    event_id, event_type, data_lines = None, "message", []
    for raw in response.iter_lines(decode_unicode=True, chunk_size=None):
        line = raw if raw is not None else ""
        if line == "":
            if data_lines:
                text = "\n".join(data_lines)
                try:
                    data = json.loads(text)
                except ValueError:
                    data = text
                yield SSEEvent(event_id, event_type, data)
            event_id, event_type, data_lines = None, "message", []
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "id":
            event_id = value
        elif field == "event":
            event_type = value
        elif field == "data":
            data_lines.append(value)


class JobsClient:
    def __init__(self, base_url: str, session: requests.Session | None = None, timeout: float = 30.0,
                 api_key: str | None = None):
        self.base_url = base_url.rstrip("/")
        self.http = session or requests.Session()
        self.timeout = timeout
        if api_key:
            self.http.headers["Authorization"] = f"Bearer {api_key}"

    def submit(self, body: dict, wait: int | None = None) -> requests.Response:
        headers = {"Prefer": f"wait={wait}"} if wait else {}
        timeout = self.timeout + (wait or 0)
        return self.http.post(f"{self.base_url}/v1/jobs", json=body, headers=headers, timeout=timeout)

    def get(self, job_id: str) -> dict:
        response = self.http.get(f"{self.base_url}/v1/jobs/{job_id}", timeout=self.timeout)
        response.raise_for_status()
        return response.json()

    def list(self, **params) -> dict:
        response = self.http.get(f"{self.base_url}/v1/jobs", params=params, timeout=self.timeout)
        response.raise_for_status()
        return response.json()

    def cancel(self, job_id: str) -> requests.Response:
        return self.http.post(f"{self.base_url}/v1/jobs/{job_id}/cancel", timeout=self.timeout)

    def events(self, job_id: str, last_event_id: str | None = None, timeout: float | None = None
               ) -> Iterator[SSEEvent]:
        headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
        with self.http.get(f"{self.base_url}/v1/jobs/{job_id}/events", headers=headers, stream=True,
                           timeout=timeout or self.timeout) as response:
            response.raise_for_status()
            yield from iter_sse(response)

    def wait(self, job_id: str, poll_seconds: float = 0.2, max_seconds: float = 600.0) -> dict:
        import time

        deadline = time.monotonic() + max_seconds
        while True:
            job = self.get(job_id)
            if job["status"] in FINAL or time.monotonic() > deadline:
                return job
            time.sleep(poll_seconds)

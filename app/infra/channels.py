"""Names of every Redis key, pub/sub channel and Celery queue genq uses.

All of them start with the settings' `key_prefix`, so several deployments (or test sessions) can
share one Redis without seeing each other, and clean-up is one `SCAN MATCH prefix:*`.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Channels:
    prefix: str = "genq"

    def job_events(self, job_id: str) -> str:
        """A job's replayable event log (a Redis stream with a TTL)."""
        return f"{self.prefix}:job:{job_id}:events"

    def job_live(self, job_id: str) -> str:
        """The pub/sub channel carrying a job's events as they happen."""
        return f"{self.prefix}:job:{job_id}:live"

    @property
    def control(self) -> str:
        """Pub/sub channel from the API to every worker (cancel requests)."""
        return f"{self.prefix}:control"

    def worker_stats(self, worker_id: str) -> str:
        """A worker's latest engine stats (JSON string, expires when the worker stops reporting)."""
        return f"{self.prefix}:worker:{worker_id}"

    def model_report(self, model_name: str) -> str:
        """A served model's tokenizer and context length as its workers report them (a hash, no
        TTL; app/infra/model_reports.py), for the API's context check."""
        return f"{self.prefix}:model:{model_name}"

    @property
    def workers(self) -> str:
        """Sorted set of worker ids scored by when they last reported."""
        return f"{self.prefix}:workers"

    def console_session(self, digest: str) -> str:
        """A web console sign-in (JSON with a TTL), under the SHA-256 of its cookie's value
        (app/api/console/sessions.py)."""
        return f"{self.prefix}:console:session:{digest}"

    @property
    def kombu_prefix(self) -> str:
        """Prefix of Celery's own keys (queues, bindings), via kombu's `global_keyprefix`."""
        return f"{self.prefix}:celery:"

    @property
    def pattern(self) -> str:
        return f"{self.prefix}:*"

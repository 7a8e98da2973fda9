"""What a submission must pass before its job is created, cheapest check first: the key's largest
`max_tokens` (422), the model's context (422, with the token counts), the broker queue's depth
(503 + Retry-After). The key's queued + running jobs (429) are checked by the job's insert itself
(`app.jobs.store.create_job(max_active=...)`), in the same statement.

Refusals are `Problem`s; the API renders them as problem+json, the OpenAI endpoints in OpenAI's
error shape.
"""
from __future__ import annotations

from redis import Redis
from redis.exceptions import RedisError

from app.infra.broker import queue_depth
from app.infra.channels import Channels
from app.infra.problems import Problem
from app.infra.settings import Settings
from app.tenancy.context_window import ContextWindow
from app.tenancy.keys import KeyIdentity

SHED_RETRY_AFTER_SECONDS = 5


class Admission:
    def __init__(self, settings: Settings, redis: Redis, channels: Channels):
        self.settings = settings
        self.redis = redis
        self.channels = channels
        # the model's tokenizer, from its files here or the workers' report in Redis, at first use
        self.context_window = ContextWindow(settings, redis, channels)

    def max_active_jobs(self, key: KeyIdentity) -> int:
        """The key's limit of queued + running jobs."""
        return key.max_active_jobs or self.settings.max_active_jobs

    def check(self, key: KeyIdentity, job_input: dict) -> None:
        """Raise the problem that refuses a job with this input (`GenerationInput.stored()` form)."""
        max_tokens = job_input["max_tokens"]
        limit = key.max_tokens or self.settings.max_tokens_limit
        if limit is not None and max_tokens > limit:
            raise Problem(422, f"max_tokens: this key may ask for at most {limit} tokens, got {max_tokens}",
                          title="Invalid request body", type="validation-error",
                          errors=[{"field": "max_tokens", "message": f"must be at most {limit} for this key",
                                   "type": "quota_max_tokens"}])
        self._check_context(job_input, max_tokens)
        self._check_queue_depth()

    def _check_context(self, job_input: dict, max_tokens: int) -> None:
        field = "prompt" if "prompt" in job_input else "messages"
        texts = [job_input["prompt"]] if field == "prompt" else [m["content"] for m in job_input["messages"]]
        overflow = self.context_window.overflow(texts, max_tokens)
        if overflow is not None:
            raise Problem(422, f"{field}: the prompt has {overflow.prompt_tokens} tokens; with max_tokens "
                          f"{overflow.max_tokens} that is more than the model's context of {overflow.max_model_len} "
                          "tokens", title="Prompt too long", type="context-length-exceeded",
                          prompt_tokens=overflow.prompt_tokens, max_tokens=overflow.max_tokens,
                          max_model_len=overflow.max_model_len,
                          errors=[{"field": field, "message": "longer than the model's context",
                                   "type": "context_length_exceeded"}])

    def _check_queue_depth(self) -> None:
        if not self.settings.max_queue_depth:
            return
        try:
            depth = queue_depth(self.redis, self.channels, self.settings.queue)
        except RedisError:
            return   # the submission itself will find out (and defer or fail the enqueue)
        if depth >= self.settings.max_queue_depth:
            raise Problem(503, f"the queue holds {depth} jobs (limit {self.settings.max_queue_depth}); "
                          "retry later", title="Service overloaded", type="overloaded",
                          headers={"Retry-After": str(SHED_RETRY_AFTER_SECONDS)})

"""The body of `POST /v1/jobs`: what a job generates from (`GenerationInput`), plus the job's
priority, metadata and webhook. Validated with pydantic; /openapi.json is built from it."""
from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import Field, StrictInt, StrictStr, model_validator

from app.jobs.inputs import MAX_METADATA_BYTES, GenerationInput, has_control_characters
from app.webhooks.payloads import events_filter
from app.webhooks.targets import check_url_form

JOB_FIELDS = ("model", "priority", "service_tier", "metadata", "webhook", "webhook_events_filter")   # not the generation's


class JobCreate(GenerationInput):
    """`POST /v1/jobs`."""
    model: Annotated[StrictStr, Field(min_length=1, max_length=255)] | None = None
    priority: Annotated[StrictInt, Field(ge=0, le=9)] = 0
    # The lane (docs/fairness.md): "flex" waits behind every "default" job (fair scheduling)
    service_tier: Literal["default", "flex"] = "default"
    metadata: dict[StrictStr, Any] | None = None
    webhook: Annotated[StrictStr, Field(min_length=1, max_length=2048)] | None = None   # docs/webhooks.md
    webhook_events_filter: Annotated[list[Literal["start", "output", "completed"]], Field(min_length=1)] | None = None

    @model_validator(mode="after")
    def _check_webhook(self) -> "JobCreate":
        if self.webhook is None:
            if self.webhook_events_filter is not None:
                raise ValueError("`webhook_events_filter` needs a `webhook`")
            return self
        check_url_form(self.webhook)
        self.webhook_events_filter = events_filter(self.webhook_events_filter)
        return self

    @model_validator(mode="after")
    def _check_metadata(self) -> "JobCreate":
        if self.metadata is not None and has_control_characters(self.metadata):
            raise ValueError("`metadata` strings must not contain control characters (tab, newline and "
                             "carriage return are allowed) or unpaired surrogates")
        if self.metadata is not None:
            try:
                size = len(json.dumps(self.metadata, allow_nan=False).encode())
            except ValueError:
                raise ValueError("`metadata` must be JSON without NaN or infinities") from None
            if size > MAX_METADATA_BYTES:
                raise ValueError(f"`metadata` must be at most {MAX_METADATA_BYTES} bytes of JSON")
        return self

    def generation_input(self) -> GenerationInput:
        return GenerationInput.model_validate(self.stored_input())

    def stored_input(self) -> dict[str, Any]:
        """The job's `input` column (what `generation_input().stored()` gives, without revalidating)."""
        return self.stored(exclude=set(JOB_FIELDS))

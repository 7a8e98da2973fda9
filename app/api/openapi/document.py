"""The OpenAPI 3.1 document of the job API, built from the pydantic models that validate requests
(`app.api.job_request`) and the response models below, so the document and the validation cannot
drift. The OpenAI-compatible endpoints (models, completions, files, batches) come from
`app.api.openapi.openai`, built the same way. Served at `/openapi.json`.
"""
from __future__ import annotations

from typing import Any, Literal

from app.api.openapi import openai as openai_doc
from app.api.openapi.common import PROBLEM_MIME, REF, OpenModel
from app.api.job_request import JobCreate
from app.jobs.models import ALL_STATUSES
from app.tenancy.idempotency import MAX_KEY_LENGTH


class FieldError(OpenModel):
    field: str | None
    message: str
    type: str


class Problem(OpenModel):
    """RFC 9457 problem details."""
    type: str
    title: str
    status: int
    detail: str
    instance: str | None = None
    errors: list[FieldError] | None = None


class JobOutput(OpenModel):
    text: str | None
    finish_reason: str | None


class JobUsage(OpenModel):
    prompt_tokens: int | None
    completion_tokens: int | None
    cached_prompt_tokens: int | None


class JobMetrics(OpenModel):
    queue_seconds: float | None
    time_to_first_token_seconds: float | None
    generation_seconds: float | None
    tokens_per_second: float | None


class JobError(OpenModel):
    type: str
    message: str | None


class JobUrls(OpenModel):
    self: str
    cancel: str
    events: str


class Job(OpenModel):
    id: str
    status: Literal["queued", "running", "succeeded", "failed", "canceled"]
    model: str
    priority: int
    service_tier: Literal["default", "flex"]
    created_at: str
    started_at: str | None
    completed_at: str | None
    input: dict[str, Any]
    metadata: dict[str, Any] | None
    output: JobOutput
    usage: JobUsage
    metrics: JobMetrics
    error: JobError | None
    attempts: int
    urls: JobUrls


class JobList(OpenModel):
    data: list[Job]
    next_cursor: str | None
    next: str | None


class WorkerList(OpenModel):
    data: list[dict[str, Any]]


class Health(OpenModel):
    status: str


class WebhookDelivery(OpenModel):
    attempt: int
    started_at: str
    duration_seconds: float
    status_code: int | None
    error: str | None
    next_attempt_at: str | None


class WebhookEvent(OpenModel):
    id: str
    type: Literal["job.started", "job.output", "job.completed"]
    status: Literal["pending", "delivered", "failed"]
    attempts: int
    created_at: str
    next_attempt_at: str | None
    completed_at: str | None
    deliveries: list[WebhookDelivery]


class FairShareFigures(OpenModel):
    counter: float
    served_tokens: int


class QueueWait(OpenModel):
    window: int
    p50: float | None
    p95: float | None
    max: float | None


class KeyUsage(OpenModel):
    object: Literal["usage"]
    key: str
    weight: float
    scheduling: Literal["fair", "fifo"]
    jobs: dict[str, int]
    prompt_tokens: int
    completion_tokens: int
    fair_share: FairShareFigures
    queue_wait_seconds: QueueWait


class JobWebhooks(OpenModel):
    webhook: str | None
    webhook_events_filter: list[str] | None
    data: list[WebhookEvent]


def _json(ref: str, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": {"$ref": ref}}}}


def _problems(*statuses: int) -> dict:
    descriptions = {400: "Malformed request", 401: "Missing, unknown or revoked API key", 404: "Not found "
                    "(also another key's job)", 409: "Conflict", 413: "Body too large", 415: "Body is not JSON",
                    422: "Invalid request body", 429: "Rate limit or quota exceeded (Retry-After)",
                    503: "Overloaded or unavailable (Retry-After)"}
    return {str(s): {"description": descriptions[s],
                     "content": {PROBLEM_MIME: {"schema": {"$ref": "#/components/schemas/Problem"}}}}
            for s in statuses}


def _schemas() -> dict[str, Any]:
    schemas: dict[str, Any] = {}
    for model in (JobCreate, Problem, Job, JobList, JobWebhooks, WorkerList, KeyUsage, Health):
        schema = model.model_json_schema(ref_template=REF)
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    _exactly_one_prompt_form(schemas["JobCreate"])
    return schemas


def _merged(*groups: dict[str, Any]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for group in groups:
        clashes = {name for name in set(merged) & set(group) if merged[name] != group[name]}
        if clashes:
            raise RuntimeError(f"two different OpenAPI schemas are named {sorted(clashes)}")
        merged.update(group)
    return merged


def _exactly_one_prompt_form(schema: dict[str, Any]) -> None:
    """What `GenerationInput._check` enforces, said in JSON Schema: `prompt` or `messages`, not both
    (the document asks for the one that is sent, not for an explicit null beside it)."""
    for name in ("prompt", "messages"):
        prop = schema["properties"][name]
        variants = [v for v in prop.pop("anyOf") if v.get("type") != "null"]
        prop.update(variants[0])
        prop.pop("default", None)
    schema["oneOf"] = [{"required": ["prompt"]}, {"required": ["messages"]}]


JOB_ID = {"name": "job_id", "in": "path", "required": True,
          "schema": {"type": "string", "pattern": "^[0-9a-z]{26}$"}, "description": "a job id"}
COMMON = (401, 429, 503)   # 503: overloaded, or the database or Redis is unavailable (Retry-After)


def build_document() -> dict[str, Any]:
    job = "#/components/schemas/Job"
    paths: dict[str, Any] = {
        "/v1/jobs": {
            "post": {
                "operationId": "createJob", "summary": "Submit a generation job",
                "parameters": [
                    {"name": "Prefer", "in": "header", "required": False, "schema": {"type": "string"},
                     "description": "`wait=N` (RFC 7240): wait up to N seconds (at most 60) for the result"},
                    {"name": "Idempotency-Key", "in": "header", "required": False,
                     "schema": {"type": "string", "minLength": 1, "maxLength": MAX_KEY_LENGTH,
                                "pattern": "^[!-~]+$"},
                     "description": "the same key and body return the original job for 24 h"},
                ],
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/JobCreate"}}}},
                "responses": {"201": _json(job, "Finished within `Prefer: wait`"),
                              "202": _json(job, "Accepted (queued), or an idempotent replay"),
                              **_problems(400, 409, 413, 415, 422, *COMMON)},
            },
            "get": {
                "operationId": "listJobs", "summary": "List this key's jobs, newest first",
                "parameters": [
                    {"name": "status", "in": "query", "required": False,
                     "schema": {"type": "string", "enum": list(ALL_STATUSES)}},
                    {"name": "limit", "in": "query", "required": False,
                     "schema": {"type": "integer", "minimum": 1, "maximum": 100, "default": 20}},
                    {"name": "cursor", "in": "query", "required": False, "schema": {"type": "string"}},
                ],
                "responses": {"200": _json("#/components/schemas/JobList", "A page of jobs"),
                              **_problems(400, *COMMON)},
            },
        },
        "/v1/jobs/{job_id}": {"get": {
            "operationId": "getJob", "summary": "Get a job", "parameters": [JOB_ID],
            "responses": {"200": _json(job, "The job"), **_problems(404, *COMMON)}}},
        "/v1/jobs/{job_id}/cancel": {"post": {
            "operationId": "cancelJob", "summary": "Cancel a queued or running job", "parameters": [JOB_ID],
            "responses": {"200": _json(job, "Canceled"), "202": _json(job, "Cancel requested, not yet confirmed"),
                          **_problems(404, 409, *COMMON)}}},
        "/v1/jobs/{job_id}/events": {"get": {
            "operationId": "jobEvents", "summary": "Stream a job's events (Server-Sent Events)",
            "parameters": [JOB_ID, {"name": "Last-Event-ID", "in": "header", "required": False,
                                    "schema": {"type": "string"}}],
            "responses": {"200": {"description": "text/event-stream: status, token, error, done",
                                  "content": {"text/event-stream": {"schema": {"type": "string"}}}},
                          **_problems(400, 404, *COMMON)}}},
        "/v1/jobs/{job_id}/webhooks": {"get": {
            "operationId": "jobWebhooks", "summary": "A job's webhook events and every delivery attempt",
            "parameters": [JOB_ID],
            "responses": {"200": _json("#/components/schemas/JobWebhooks", "The job's webhook events"),
                          **_problems(404, *COMMON)}}},
        "/v1/workers": {"get": {
            "operationId": "listWorkers", "summary": "Live workers and their engine stats",
            "responses": {"200": _json("#/components/schemas/WorkerList", "Workers"), **_problems(*COMMON)}}},
        "/v1/usage": {"get": {
            "operationId": "getUsage", "summary": "What the calling key got: jobs, tokens, fair share, queue waits",
            "responses": {"200": _json("#/components/schemas/KeyUsage", "The key's figures"), **_problems(*COMMON)}}},
        "/healthz": {"get": {"operationId": "healthz", "security": [], "summary": "The process is alive",
                             "responses": {"200": _json("#/components/schemas/Health", "Alive")}}},
        "/health": {"get": {"operationId": "health", "security": [], "summary": "The service can generate now: "
                            "database and Redis answer and a worker's engine is loaded and warm",
                            "responses": {"200": _json("#/components/schemas/Health", "Ready to generate"),
                                          **_problems(503)}}},
        "/readyz": {"get": {"operationId": "readyz", "security": [], "summary": "Database and Redis answer",
                            "responses": {"200": _json("#/components/schemas/Health", "Ready"),
                                          **_problems(503)}}},
        "/metrics": {"get": {"operationId": "metrics", "security": [], "summary": "Prometheus metrics",
                             "responses": {"200": {"description": "Prometheus text format",
                                                   "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
    }
    for path, item in openai_doc.paths().items():
        paths.setdefault(path, {}).update(item)
    return {
        "openapi": "3.1.0",
        "info": {"title": "genq", "version": "1", "description": "Asynchronous LLM generation jobs. Every /v1 "
                 "request needs `Authorization: Bearer <key>`; every error is RFC 9457 problem+json."},
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {"schemas": _merged(_schemas(), openai_doc.schemas()),
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                                      "description": "an API key from `genq keys create`"}}},
    }

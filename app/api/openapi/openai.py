"""The OpenAI-compatible endpoints (/v1/models, completions, files, batches) in the OpenAPI
document: request bodies from the pydantic models that validate them (`app.openai.formats`), response
shapes from the models below. `app.api.openapi.document.build_document` merges `paths()` and `schemas()`.

Their errors are OpenAI's `{"error": {...}}` (application/json), except what genq's key layer
answers before the endpoint runs (401, and the rate limit's 429), which is problem+json.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from app.api.openapi.common import PROBLEM_MIME, REF, OpenModel
from app.openai.formats import ChatCompletionRequest, CompletionRequest

TAG = "OpenAI-compatible"


class OpenAIErrorDetail(OpenModel):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIError(OpenModel):
    error: OpenAIErrorDetail


class Model(OpenModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(OpenModel):
    object: Literal["list"]
    data: list[Model]


class PromptTokensDetails(OpenModel):
    cached_tokens: int


class Usage(OpenModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class AssistantMessage(OpenModel):
    role: Literal["assistant"]
    content: str | None
    refusal: str | None = None


class ChatChoice(OpenModel):
    index: int
    message: AssistantMessage
    logprobs: dict[str, Any] | None
    finish_reason: Literal["stop", "length"] | None


class CompletionChoice(OpenModel):
    index: int
    text: str
    logprobs: dict[str, Any] | None
    finish_reason: Literal["stop", "length"] | None


class _Completion(OpenModel):
    """What both endpoints' responses hold; a subclass narrows `object` and `choices` (a field
    redeclared keeps its place, so the schemas list the fields in this order)."""
    id: str
    object: str
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChoice | CompletionChoice]
    usage: Usage


class ChatCompletion(_Completion):
    object: Literal["chat.completion"]
    choices: list[ChatChoice]


class Completion(_Completion):
    object: Literal["text_completion"]
    choices: list[CompletionChoice]


class FileObject(OpenModel):
    id: str
    object: Literal["file"]
    bytes: int
    created_at: int
    filename: str
    purpose: Literal["batch", "batch_output"]
    status: str
    status_details: str | None = None
    expires_at: int | None = None


class FileList(OpenModel):
    object: Literal["list"]
    data: list[FileObject]
    has_more: bool


class FileUpload(BaseModel):
    model_config = ConfigDict(extra="allow", json_schema_extra={"properties": {"file": {
        "type": "string", "format": "binary", "description": "JSONL, one request per line (UTF-8)"}}})
    purpose: Literal["batch"]


class BatchCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    input_file_id: str
    endpoint: Literal["/v1/chat/completions", "/v1/completions"]
    completion_window: Literal["24h"]
    metadata: dict[str, str] | None = None


class BatchRequestCounts(OpenModel):
    total: int
    completed: int
    failed: int


class Batch(OpenModel):
    id: str
    object: Literal["batch"]
    endpoint: str
    errors: dict[str, Any] | None
    input_file_id: str
    completion_window: str
    status: Literal["validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling",
                    "cancelled"]
    output_file_id: str | None
    error_file_id: str | None
    created_at: int
    in_progress_at: int | None
    expires_at: int | None
    finalizing_at: int | None
    completed_at: int | None
    failed_at: int | None
    expired_at: int | None
    cancelling_at: int | None
    cancelled_at: int | None
    request_counts: BatchRequestCounts
    metadata: dict[str, str] | None


class BatchList(OpenModel):
    object: Literal["list"]
    data: list[Batch]
    first_id: str | None
    last_id: str | None
    has_more: bool


MODELS = (OpenAIError, ModelList, ChatCompletion, Completion, FileList, FileUpload, BatchCreate, BatchList)
REQUESTS = {"CompletionRequest": CompletionRequest, "ChatCompletionRequest": ChatCompletionRequest}


def schemas() -> dict[str, Any]:
    found: dict[str, Any] = {}
    for name, model in [(m.__name__, m) for m in MODELS] + list(REQUESTS.items()):
        schema = model.model_json_schema(ref_template=REF)
        found.update(schema.pop("$defs", {}))
        found[name] = schema
    return found


def _ref(name: str) -> dict:
    return {"$ref": REF.format(model=name)}


def _ok(name: str, description: str) -> dict:
    return {"200": {"description": description, "content": {"application/json": {"schema": _ref(name)}}}}


ERROR_DESCRIPTIONS = {400: "Invalid request (`param` names the field)", 404: "Not found (also another key's)",
                      413: "Body too large", 429: "Too many active jobs, or the key's rate limit (problem+json)",
                      499: "The request's job was canceled", 500: "The generation failed",
                      503: "Overloaded, the database or Redis unavailable, or (streamed requests) the queue "
                      "unreachable (Retry-After)", 504: "Not finished "
                      "within 10 minutes (the job continues)"}


def _errors(*statuses: int) -> dict:
    """OpenAI-shaped errors (503 always: a dependency outage), and what the key layer answers in
    problem+json (401 always, 429 too)."""
    responses = {str(s): {"description": ERROR_DESCRIPTIONS[s],
                          "content": {"application/json": {"schema": _ref("OpenAIError")}}}
                 for s in sorted({*statuses, 503})}
    problem = {PROBLEM_MIME: {"schema": _ref("Problem")}}
    responses["401"] = {"description": "Missing, unknown or revoked API key", "content": problem}
    responses.setdefault("429", {"description": "Rate limit exceeded (Retry-After)", "content": {}})
    responses["429"]["content"].update(problem)
    return responses


def _path_id(name: str, description: str) -> dict:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string", "maxLength": 64},
            "description": description}


def _generation(operation_id: str, summary: str, request: str, response: str) -> dict:
    return {"post": {
        "operationId": operation_id, "summary": summary, "tags": [TAG],
        "requestBody": {"required": True, "content": {"application/json": {"schema": _ref(request)}}},
        "responses": {"200": {"description": "The finished completion; with `stream: true` Server-Sent Events, "
                              "`data: {chunk}` lines then `data: [DONE]`",
                              "content": {"application/json": {"schema": _ref(response)},
                                          "text/event-stream": {"schema": {"type": "string"}}}},
                      **_errors(400, 404, 413, 429, 499, 500, 503, 504)}}}


def paths() -> dict[str, Any]:
    model_id = _path_id("model_id", "the served model's name")
    file_id = _path_id("file_id", "a file id (`file-...`)")
    batch_id = _path_id("batch_id", "a batch id (`batch_...`)")
    return {
        "/v1/models": {"get": {"operationId": "listModels", "summary": "The served model", "tags": [TAG],
                               "responses": {**_ok("ModelList", "Models"), **_errors()}}},
        "/v1/models/{model_id}": {"get": {
            "operationId": "getModel", "summary": "A model", "tags": [TAG], "parameters": [model_id],
            "responses": {**_ok("Model", "The model"), **_errors(404)}}},
        "/v1/completions": _generation("createCompletion", "Complete a prompt (one genq job)",
                                       "CompletionRequest", "Completion"),
        "/v1/chat/completions": _generation("createChatCompletion", "Answer a conversation (one genq job)",
                                            "ChatCompletionRequest", "ChatCompletion"),
        "/v1/files": {
            "post": {"operationId": "uploadFile", "summary": "Upload a JSONL batch input", "tags": [TAG],
                     "requestBody": {"required": True, "content": {"multipart/form-data": {
                         "schema": _ref("FileUpload")}}},
                     "responses": {**_ok("FileObject", "The file"), **_errors(400, 413)}},
            "get": {"operationId": "listFiles", "summary": "This key's files, newest first", "tags": [TAG],
                    "responses": {**_ok("FileList", "Files"), **_errors()}},
        },
        "/v1/files/{file_id}": {"get": {
            "operationId": "getFile", "summary": "A file object", "tags": [TAG], "parameters": [file_id],
            "responses": {**_ok("FileObject", "The file"), **_errors(404)}}},
        "/v1/files/{file_id}/content": {"get": {
            "operationId": "getFileContent", "summary": "A file's content (batch input, output or errors)",
            "tags": [TAG], "parameters": [file_id],
            "responses": {"200": {"description": "JSONL", "content": {"application/jsonl": {
                "schema": {"type": "string"}}}}, **_errors(404)}}},
        "/v1/batches": {
            "post": {"operationId": "createBatch", "summary": "Run a JSONL file of requests as a batch",
                     "tags": [TAG], "requestBody": {"required": True, "content": {"application/json": {
                         "schema": _ref("BatchCreate")}}},
                     "responses": {**_ok("Batch", "The batch (validating; with the queue unreachable it "
                                         "starts once the queue is back)"), **_errors(400, 404)}},
            "get": {"operationId": "listBatches", "summary": "This key's batches, newest first", "tags": [TAG],
                    "parameters": [
                        {"name": "limit", "in": "query", "required": False,
                         "schema": {"type": "integer", "minimum": 1, "maximum": 100, "default": 20}},
                        {"name": "after", "in": "query", "required": False, "schema": {"type": "string"},
                         "description": "the last batch id of the previous page"}],
                    "responses": {**_ok("BatchList", "A page of batches"), **_errors(400)}},
        },
        "/v1/batches/{batch_id}": {"get": {
            "operationId": "getBatch", "summary": "A batch (one past its window expires now)", "tags": [TAG],
            "parameters": [batch_id], "responses": {**_ok("Batch", "The batch"), **_errors(404)}}},
        "/v1/batches/{batch_id}/cancel": {"post": {
            "operationId": "cancelBatch", "summary": "Cancel a batch", "tags": [TAG], "parameters": [batch_id],
            "responses": {**_ok("Batch", "The batch, cancelling or cancelled"), **_errors(404)}}},
    }

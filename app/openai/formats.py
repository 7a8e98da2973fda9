"""OpenAI's request and response shapes for completions and chat completions, mapped onto genq jobs.

No Flask here: the API uses it for `/v1/completions` and `/v1/chat/completions`, and the batch
finalizer for the response bodies it writes to output files.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

from app.jobs.inputs import GenerationInput
from app.jobs.models import Job

CHAT_ENDPOINT = "/v1/chat/completions"
COMPLETIONS_ENDPOINT = "/v1/completions"
ENDPOINTS = (CHAT_ENDPOINT, COMPLETIONS_ENDPOINT)
INTERACTIVE_PRIORITY = 0     # lower is more urgent, in the Celery queue and in the engine
BATCH_PRIORITY = 9
DEFAULT_MAX_TOKENS = 16      # OpenAI's completions default; chat has none, genq's job default applies


class OpenAIError(Exception):
    """An error in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: StrictBool = False


class _Common(BaseModel):
    """Fields both endpoints take. genq extensions (as vLLM has them): top_k, min_p, min_tokens,
    repetition_penalty, ignore_eos."""
    model_config = ConfigDict(extra="forbid")

    model: StrictStr
    max_tokens: StrictInt | None = None
    temperature: StrictFloat | None = None
    top_p: StrictFloat | None = None
    n: StrictInt = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = None
    presence_penalty: StrictFloat | None = None
    frequency_penalty: StrictFloat | None = None
    user: StrictStr | None = None
    top_k: StrictInt | None = None
    min_p: StrictFloat | None = None
    min_tokens: StrictInt | None = None
    repetition_penalty: StrictFloat | None = None
    ignore_eos: StrictBool | None = None
    logit_bias: dict[str, Any] | None = None
    # text, json_object, json_schema as OpenAI has them (the SDK's `.parse()` sends json_schema); regex,
    # choice and grammar as genq's jobs API (app/jobs/response_format.py)
    response_format: dict[str, Any] | None = None
    # OpenAI's lanes: "auto" and "default" are interactive, "flex" waits behind them (docs/fairness.md)
    service_tier: StrictStr | None = None

    @property
    def lane(self) -> str:
        """The job's service tier: "default" or "flex" (OpenAIError for a tier genq does not have)."""
        tier = self.service_tier or "auto"
        if tier in ("auto", "default"):
            return "default"
        if tier == "flex":
            return "flex"
        raise OpenAIError(400, f"service_tier must be one of 'auto', 'default', 'flex', got {tier!r}",
                          param="service_tier")

    def _sampling(self) -> dict[str, Any]:
        if self.logit_bias:
            raise OpenAIError(400, "logit_bias is not supported", param="logit_bias")
        fields = ("temperature", "top_p", "seed", "presence_penalty", "frequency_penalty", "top_k", "min_p",
                  "min_tokens", "repetition_penalty", "ignore_eos")
        values = {name: getattr(self, name) for name in fields if getattr(self, name) is not None}
        if self.stop:
            values["stop"] = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        if self.n != 1:
            values["n"] = self.n
        if self.response_format is not None and self.response_format.get("type") != "text":
            values["response_format"] = self.response_format
        return values

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: StrictStr


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[ContentPart] | None = None
    name: StrictStr | None = None

    def plain(self) -> dict[str, str]:
        content = self.content if isinstance(self.content, str) or self.content is None else \
            "".join(part.text for part in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": content or ""}


class ChatCompletionRequest(_Common):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = None

    def job_input(self) -> dict[str, Any]:
        if self.top_logprobs is not None and not self.logprobs:
            raise OpenAIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        values = {"messages": [m.plain() for m in self.messages], **self._sampling()}
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        if max_tokens is not None:
            values["max_tokens"] = max_tokens
        if self.logprobs:
            values["logprobs"] = self.top_logprobs or 0
        return validated_input(values)


class CompletionRequest(_Common):
    prompt: StrictStr | list[StrictStr]
    logprobs: StrictInt | None = None
    echo: StrictBool = False
    suffix: StrictStr | None = None
    best_of: StrictInt | None = None

    def job_input(self) -> dict[str, Any]:
        prompt = self.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise OpenAIError(400, "genq takes one prompt per request (send a batch for many)", param="prompt")
            prompt = prompt[0]
        if self.echo:
            raise OpenAIError(400, "echo is not supported", param="echo")
        if self.suffix:
            raise OpenAIError(400, "suffix is not supported", param="suffix")
        if self.best_of not in (None, self.n):
            raise OpenAIError(400, "best_of must equal n", param="best_of")
        values = {"prompt": prompt, "max_tokens": DEFAULT_MAX_TOKENS, **self._sampling()}
        if self.max_tokens is not None:
            values["max_tokens"] = self.max_tokens
        if self.logprobs is not None:
            values["logprobs"] = self.logprobs
        return validated_input(values)


def validated_input(values: dict[str, Any]) -> dict[str, Any]:
    """A job's stored `input`, checked by the same rules as `POST /v1/jobs`."""
    try:
        return GenerationInput.model_validate(values).stored()
    except ValidationError as exc:
        raise openai_validation_error(exc) from None


def openai_validation_error(exc: ValidationError) -> OpenAIError:
    first = exc.errors(include_url=False, include_context=False, include_input=False)[0]
    param = ".".join(str(part) for part in first["loc"]) or None
    message = f"{param}: {first['msg']}" if param else first["msg"]
    return OpenAIError(400, message, param=param, code="invalid_value" if param else None)


def parse_request(endpoint: str, body: Any) -> ChatCompletionRequest | CompletionRequest:
    if not isinstance(body, dict):
        raise OpenAIError(400, "the request body must be a JSON object")
    model = ChatCompletionRequest if endpoint == CHAT_ENDPOINT else CompletionRequest
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise openai_validation_error(exc) from None


# -- responses ------------------------------------------------------------------------------------

def response_id(endpoint: str, job_id: str) -> str:
    return f"{'chatcmpl' if endpoint == CHAT_ENDPOINT else 'cmpl'}-{job_id}"


def created(job: Job) -> int:
    return int(job.created_at.timestamp())


def usage(job: Job) -> dict[str, Any]:
    prompt, completion = job.prompt_tokens or 0, job.completion_tokens or 0
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": job.cached_tokens or 0}}


def _samples(job: Job) -> list[dict[str, Any]]:
    if job.choices:
        return job.choices
    return [{"index": 0, "text": job.output_text or "", "finish_reason": job.finish_reason}]


def _finish_reason(reason: str | None) -> str | None:
    # "abort" (canceled) has no OpenAI name; such jobs are answered as errors before this point.
    return reason if reason in ("stop", "length") else ("stop" if reason else None)


def chat_logprobs(steps: list[dict[str, Any]] | None) -> dict[str, Any] | None:
    if steps is None:
        return None

    def entry(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    return {"content": [{**entry(s["token"], s["logprob"]), "top_logprobs": [entry(t, lp) for t, lp in s["top"]]}
                        for s in steps], "refusal": None}


def completion_logprobs(steps: list[dict[str, Any]] | None, text_offset: int = 0) -> dict[str, Any] | None:
    if steps is None:
        return None
    offsets, offset = [], text_offset
    for step in steps:
        offsets.append(offset)
        offset += len(step["token"])
    return {"tokens": [s["token"] for s in steps], "token_logprobs": [s["logprob"] for s in steps],
            "top_logprobs": [dict(s["top"]) for s in steps], "text_offset": offsets}


def response_body(endpoint: str, job: Job) -> dict[str, Any]:
    """The finished (succeeded) job as OpenAI's chat.completion or text_completion object."""
    choices = []
    for sample in _samples(job):
        reason = _finish_reason(sample.get("finish_reason"))
        if endpoint == CHAT_ENDPOINT:
            choices.append({"index": sample["index"], "message": {"role": "assistant", "content": sample["text"],
                                                                   "refusal": None},
                            "logprobs": chat_logprobs(sample.get("logprobs")), "finish_reason": reason})
        else:
            choices.append({"index": sample["index"], "text": sample["text"],
                            "logprobs": completion_logprobs(sample.get("logprobs")), "finish_reason": reason})
    return {"id": response_id(endpoint, job.id),
            "object": "chat.completion" if endpoint == CHAT_ENDPOINT else "text_completion",
            "created": created(job), "model": job.model, "system_fingerprint": None, "choices": choices,
            "service_tier": job.service_tier, "usage": usage(job)}


def chunk(endpoint: str, job: Job, choices: list[dict[str, Any]], usage_: dict[str, Any] | None = None,
          with_usage_field: bool = False) -> dict[str, Any]:
    body = {"id": response_id(endpoint, job.id),
            "object": "chat.completion.chunk" if endpoint == CHAT_ENDPOINT else "text_completion",
            "created": created(job), "model": job.model, "system_fingerprint": None, "choices": choices}
    if with_usage_field:
        body["usage"] = usage_
    return body


def stream_logprobs(endpoint: str, steps: list[dict[str, Any]] | None, text_offset: int = 0):
    """A stream chunk's `logprobs`: the steps of its tokens as the non-streamed response shapes them
    (completions' `text_offset` counted from the start of the choice's text)."""
    if not steps:
        return None
    return chat_logprobs(steps) if endpoint == CHAT_ENDPOINT else completion_logprobs(steps, text_offset)


def delta_choice(endpoint: str, index: int, text: str | None, *, role: bool = False,
                 finish_reason: str | None = None, logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    if endpoint == CHAT_ENDPOINT:
        delta: dict[str, Any] = {}
        if role:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": _finish_reason(finish_reason)}
    return {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": _finish_reason(finish_reason)}


def job_error(job: Job) -> OpenAIError:
    """Why a job produced no completion, as the OpenAI error the request answers with."""
    if job.status == "canceled":
        return OpenAIError(499, "the request was canceled", type="invalid_request_error", code="canceled")
    if job.error_type in ("invalid_request", "invalid_input"):
        return OpenAIError(400, job.error_message or "invalid request", code=job.error_type)
    return OpenAIError(500, job.error_message or "generation failed", type="server_error", code=job.error_type)

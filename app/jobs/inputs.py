"""Request bodies, validated with pydantic. Shared by the API (validation) and the worker (which
rebuilds the engine's `SamplingParams` from a stored job input)."""
from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, field_validator,
                      model_validator)

from app.jobs import response_format as formats
from app.jobs.response_format import ResponseFormat

MAX_PROMPT_CHARS = 1_000_000
MAX_METADATA_BYTES = 16 * 1024
MAX_STOP_STRINGS = 16

Number = StrictFloat  # strict floats accept integers, never strings or booleans


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_nul(v) for v in value)
    return False


# C0 controls but tab, newline and CR; DEL; and lone UTF-16 surrogates (JSON can escape them, but they
# are not Unicode text: UTF-8 cannot encode them and PostgreSQL's jsonb refuses them).
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff]")


def plain_text(text: str) -> bool:
    """Whether `text` has no `_CONTROL` character (so PostgreSQL can store it)."""
    return not _CONTROL.search(text)


def has_control_characters(value: Any) -> bool:
    """Any `_CONTROL` character in a key or string, at any depth."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _CONTROL.search(item):
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "user", "assistant"]
    content: Annotated[StrictStr, Field(max_length=MAX_PROMPT_CHARS)]


class GenerationInput(BaseModel):
    """What a job generates from: a prompt or chat messages, and the sampling parameters.

    Stored as the job's `input` (with defaults filled in) and read back by the worker.
    """
    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: Annotated[StrictStr, Field(min_length=1, max_length=MAX_PROMPT_CHARS)] | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=1000)] | None = None
    max_tokens: Annotated[StrictInt, Field(ge=1, le=1_000_000)] = 256
    min_tokens: Annotated[StrictInt, Field(ge=0)] = 0
    temperature: Annotated[Number, Field(ge=0, le=100)] = 1.0
    top_p: Annotated[Number, Field(gt=0, le=1)] = 1.0
    top_k: Annotated[StrictInt, Field(ge=-1)] = -1
    min_p: Annotated[Number, Field(ge=0, le=1)] = 0.0
    presence_penalty: Annotated[Number, Field(ge=-2, le=2)] = 0.0
    frequency_penalty: Annotated[Number, Field(ge=-2, le=2)] = 0.0
    repetition_penalty: Annotated[Number, Field(gt=0, le=10)] = 1.0
    seed: Annotated[StrictInt, Field(ge=0, le=2**63 - 1)] | None = None
    stop: list[Annotated[StrictStr, Field(min_length=1, max_length=256)]] | None = None
    ignore_eos: StrictBool = False
    n: Annotated[StrictInt, Field(ge=1, le=16)] | None = None           # samples per job (None: 1)
    logprobs: Annotated[StrictInt, Field(ge=0, le=20)] | None = None    # top-k log-probabilities per token
    response_format: ResponseFormat | None = None                        # structured output (app/jobs/response_format.py)

    @model_validator(mode="before")
    @classmethod
    def _stop_string_as_list(cls, data: Any) -> Any:
        if _has_nul(data):
            # Stored as JSON; PostgreSQL's jsonb cannot hold a NUL character.
            raise ValueError("strings must not contain NUL (\\u0000) characters")
        if isinstance(data, dict) and isinstance(data.get("stop"), str):
            data = {**data, "stop": [data["stop"]]}
        return data

    @field_validator("response_format")
    @classmethod
    def _buildable(cls, value):
        if value is not None:
            formats.check(value)
        return value

    @model_validator(mode="after")
    def _check(self) -> "GenerationInput":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of `prompt` or `messages`")
        if self.min_tokens > self.max_tokens:
            raise ValueError("`min_tokens` must not exceed `max_tokens`")
        if self.stop is not None and len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(f"`stop` takes at most {MAX_STOP_STRINGS} strings")
        return self

    def sampling_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for the engine's `SamplingParams`."""
        return {
            "max_tokens": self.max_tokens, "min_tokens": self.min_tokens,
            "temperature": float(self.temperature), "top_p": float(self.top_p), "top_k": self.top_k,
            "min_p": float(self.min_p), "presence_penalty": float(self.presence_penalty),
            "frequency_penalty": float(self.frequency_penalty),
            "repetition_penalty": float(self.repetition_penalty), "seed": self.seed,
            "stop": list(self.stop or []), "ignore_eos": self.ignore_eos, "n": self.n or 1,
            "logprobs": self.logprobs, **formats.sampling_kwargs(self.response_format),
        }

    def stored(self, exclude: set[str] | None = None) -> dict[str, Any]:
        """The job's `input` column: everything, defaults included, without the unused prompt form
        (and without `exclude`: a subclass's own fields)."""
        stored = self.model_dump(mode="json", exclude_none=True, by_alias=True, exclude=exclude)
        if self.response_format is not None:   # a schema's own nulls (`"default": null`) are not "unset"
            stored["response_format"] = self.response_format.model_dump(mode="json", by_alias=True,
                                                                        exclude_unset=True)
        return stored

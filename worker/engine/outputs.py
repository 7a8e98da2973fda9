"""What the engine hands back to its callers."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class CompletionOutput:
    index: int                       # which of the request's n samples
    text: str                        # all text so far (stop strings excluded)
    token_ids: list[int]             # all generated tokens so far
    finish_reason: str | None = None  # "stop" | "length" | "abort" once finished
    logprobs: list[dict[int, float]] | None = None  # per generated token: {token_id: logprob}, top-k + chosen
    new_token_ids: list[int] = field(default_factory=list)  # tokens added by the last step
    new_text: str = ""               # text added by the last step

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0       # prompt tokens served from the prefix cache
    error: str | None = None         # set when the request failed inside the engine

"""Request and sequence state.

A `Request` is what a caller submitted: one prompt, its sampling params, a priority. It owns one
`Sequence` per sample (`n`). Sequence 0 computes the prompt; when it samples its first token the
other samples fork from it and share its KV blocks copy-on-write.
"""
from __future__ import annotations

import enum
import itertools
import math
import time
from dataclasses import dataclass, field

from worker.engine.block_pool import Block
from worker.engine.detokenizer import IncrementalDetokenizer
from worker.engine.sampling_params import SamplingParams


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_arrivals = itertools.count()
ANONYMOUS = ""       # the tenant of requests added without one (fair sharing: fairness.py)


class InvalidWeightError(ValueError):
    """A request's fair-share weight is not a finite number > 0."""


def check_weight(weight: float) -> float:
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
        raise InvalidWeightError(f"weight must be a finite number > 0, got {weight!r}")
    return float(weight)


@dataclass(slots=True, eq=False)
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int = 0
    arrival: int = field(default_factory=lambda: next(_arrivals))
    arrival_time: float = field(default_factory=time.monotonic)
    seqs: list["Sequence"] = field(default_factory=list)
    num_cached_tokens: int = 0
    error: str | None = None
    # structured output: the compiled grammar (a Future until the compile pool is done with it); the
    # scheduler leaves the request waiting while grammar_pending
    grammar: object = None
    grammar_pending: bool = False
    # fair sharing (fairness.py): whose service this is, and its share relative to other tenants'
    tenant: str | None = ANONYMOUS           # None: the anonymous tenant ""
    weight: float = 1.0

    def __post_init__(self) -> None:
        self.tenant = ANONYMOUS if self.tenant is None else str(self.tenant)
        self.weight = check_weight(self.weight)

    @property
    def finished(self) -> bool:
        return len(self.seqs) == self.params.n and all(s.finished for s in self.seqs)


@dataclass(slots=True, eq=False)
class Sequence:
    request: Request
    index: int                               # which sample of the request
    token_ids: list[int]                     # prompt + generated, the tokens the KV cache must hold
    detok: IncrementalDetokenizer
    generator: object = None                 # torch.Generator for seeded sampling, else None
    status: SeqStatus = SeqStatus.WAITING
    num_computed_tokens: int = 0             # tokens whose KV is in the cache
    blocks: list[Block] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # chained hashes of its full blocks
    num_registered_blocks: int = 0           # leading blocks already offered to the prefix cache
    finish_reason: str | None = None
    logprobs: list[dict[int, float]] | None = None
    output_counts: dict[int, int] = field(default_factory=dict)  # generated token -> count (penalties)
    sent_tokens: int = 0                     # generated tokens already reported to the caller
    grammar: object = None                   # structured.GrammarState: the matcher over its output tokens
    charged_prompt_tokens: int = 0           # prompt positions already charged to its tenant (not again on recompute)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.request.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def finished(self) -> bool:
        return self.status is SeqStatus.FINISHED

    @property
    def sort_key(self) -> tuple[int, int, int]:
        return (self.request.priority, self.request.arrival, self.index)

    def append(self, token_id: int) -> None:
        self.token_ids.append(token_id)
        self.output_counts[token_id] = self.output_counts.get(token_id, 0) + 1

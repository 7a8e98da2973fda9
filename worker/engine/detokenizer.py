"""Incremental detokenization with stop strings.

Text is emitted only once it is stable: a token that ends in the middle of a multi-byte UTF-8
character decodes to U+FFFD and is held until the character completes. When stop strings are set,
the last (longest stop string - 1) characters are held back too, so streamed text never shows the
start of a stop string that is later cut.
"""
from __future__ import annotations

# Prompt tokens decoded before the first generated one, so tokenizers that drop a leading space at
# the start of a text (SentencePiece) decode the first generated token as they would in context.
CONTEXT_TOKENS = 4
REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], stop: list[str] | None = None,
                 skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids = list(prompt_token_ids[-CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""           # generated text so far
        self.emitted = 0         # characters of self.text already handed out
        self.stop = list(stop or [])
        self.holdback = max((len(s) for s in self.stop), default=1) - 1

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    @property
    def pending(self) -> bool:
        return self.read_offset < len(self.ids)

    def add(self, token_id: int, check_stop: bool = True) -> str | None:
        """Append one generated token. Returns the stop string that ended the text, if any (the
        text is then cut where the stop string begins)."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) <= len(prefix) or full.endswith(REPLACEMENT):
            return None
        old_len = len(self.text)
        self.text += full[len(prefix):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return self._find_stop(old_len) if check_stop else None

    def flush(self) -> None:
        """At the end of generation: emit what is still held (an unfinished character decodes
        as U+FFFD, as any decoder would show it)."""
        if self.pending:
            prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
            full = self._decode(self.ids[self.prefix_offset:])
            self.text += full[len(prefix):]
            self.prefix_offset = self.read_offset = len(self.ids)

    def _find_stop(self, old_len: int) -> str | None:
        best = None
        for s in self.stop:
            i = self.text.find(s, max(0, old_len - len(s) + 1))
            if i != -1 and (best is None or i < best[0]):
                best = (i, s)
        if best is None:
            return None
        self.text = self.text[:best[0]]
        return best[1]

    def take_new_text(self, finished: bool) -> str:
        """The text not yet handed out, minus what must be held back while unfinished."""
        end = len(self.text) if finished else max(self.emitted, len(self.text) - self.holdback)
        out = self.text[self.emitted:end]
        self.emitted = end
        return out

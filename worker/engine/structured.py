"""Structured outputs: JSON Schema, regex, choice and Lark-grammar constraints, enforced while sampling.

The grammar library is llguidance (docs/structured-outputs.md says why, with the numbers). A
constraint is compiled once per tokenizer on a small thread pool, off the engine's step thread, and
cached by a hash of (kind, spec, tokenizer); its request waits in the scheduler meanwhile. Each
constrained sequence owns a matcher that has accepted exactly its output tokens (a fork copies it;
preemption leaves it alone, since recomputation re-reads tokens without sampling them again). Each
step the matchers of the constrained samples fill one packed bitmask (a bit per vocabulary id), which
the sampler applies to their logits before penalties, temperature and top-k/top-p/min-p.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import os
import threading
import time
from collections import OrderedDict

import numpy as np
import torch

from worker.engine.sampling_params import StructuredOutputError

log = logging.getLogger(__name__)

CACHE_SIZE = 256          # compiled grammars kept per engine (least recently used dropped first)
COMPILE_THREADS = 2       # the compile pool (llguidance drops the GIL while it builds a grammar)
# JSON as json.dumps writes it: ", " and ": " separators and no other whitespace (free whitespace lets
# small models emit newlines until max_tokens)
PARALLEL_MASKS_FROM = 8   # constrained samples in a step from which their masks are filled in parallel...
CPUS = os.cpu_count() or 1  # ...given 4 CPUs or more (on 2, the library's threads were 2x slower at batch 32)
_NEG_INF_BITS = int(np.array(-np.inf, dtype=np.float32).view(np.int32))
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarState:
    """One sequence's matcher and how many of its output tokens it has accepted."""

    __slots__ = ("matcher", "num_accepted", "terminated", "eos")

    def __init__(self, matcher, eos: frozenset[int], num_accepted: int = 0, terminated: bool = False):
        self.matcher = matcher
        self.eos = eos
        self.num_accepted = num_accepted
        self.terminated = terminated    # an EOS was accepted: the grammar allowed it, so it is complete

    def fork(self) -> GrammarState:
        return GrammarState(self.matcher.deep_copy(), self.eos, self.num_accepted, self.terminated)

    def accept(self, token: int) -> bool:
        if not self.matcher.consume_token(token):
            return False
        self.num_accepted += 1
        if token in self.eos:
            self.terminated = True
        return True


class GrammarMasks:
    """One step's masks: row j of `bitmask` is what sample `indices[j]` (in batch.samples) may draw."""

    __slots__ = ("indices", "bitmask", "dead", "scratch")

    def __init__(self, indices: list[int], bitmask: torch.Tensor, dead: dict[int, str], scratch=None):
        self.indices = indices
        self.bitmask = bitmask        # int32 [len(indices), ceil(vocab / 32)], bit t % 32 of word t // 32
        self.dead = dead              # samples whose grammar allows no token (or failed): why
        self.scratch = scratch        # reusable int32 buffer, at least [len(indices), vocab] (optional)

    def apply(self, rows: torch.Tensor) -> None:
        """rows: [num_samples, vocab] logits, one row per sample (not shared): disallowed ids -> -inf,
        padding ids past the tokenizer's vocabulary included."""
        width = rows.shape[1]
        bits = np.unpackbits(self.bitmask.numpy().view(np.uint8), axis=1, count=width, bitorder="little")
        allowed = torch.from_numpy(bits).to(rows.device)
        whole = len(self.indices) == rows.shape[0]
        if whole:
            sub = rows
        else:
            idx = torch.tensor(self.indices, device=rows.device)
            sub = rows.index_select(0, idx)
        if sub.dtype == torch.float32:
            # branch-free, in place: keep = all ones where allowed, else 0; x = (x & keep) | (-inf & ~keep).
            # Several times faster than masked_fill_ over a scattered mask on CPU.
            k = len(self.indices)
            scratch = self.scratch
            if scratch is None or scratch.device != rows.device or scratch.shape[0] < k or scratch.shape[1] < width:
                scratch = torch.empty((k, width), dtype=torch.int32, device=rows.device)
            keep = scratch[:k, :width]
            keep.copy_(allowed)
            keep.neg_()
            x = sub.view(torch.int32)
            x.bitwise_and_(keep)
            x.bitwise_or_(keep.bitwise_not_().bitwise_and_(_NEG_INF_BITS))
        else:
            sub.masked_fill_(allowed.logical_not(), float("-inf"))
        if not whole:
            rows.index_copy_(0, idx, sub)


class StructuredOutputs:
    """The engine's grammar side: compile (cached, pooled), matchers, per-step masks."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids, max_workers: int = COMPILE_THREADS,
                 cache_size: int = CACHE_SIZE):
        self.tokenizer = tokenizer
        # the logits' width; ids past the tokenizer's vocabulary (padding) are never allowed
        self.vocab_size = max(vocab_size, len(tokenizer))
        self.eos = frozenset(eos_token_ids)
        self.max_workers = max_workers
        self.cache_size = cache_size
        self.fingerprint = f"{getattr(tokenizer, 'name_or_path', '')}|{len(tokenizer)}|{vocab_size}|{sorted(self.eos)}"
        self.in_use = False                              # a constrained request was ever added
        self._cache: OrderedDict[str, concurrent.futures.Future] = OrderedDict()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._ll_tokenizer = None                        # llguidance.LLTokenizer, built on first use (~0.3 s)
        self._executor = None                            # llguidance.LLExecutor: fills a batch's masks in Rust threads
        self._bitmask: torch.Tensor | None = None
        self._apply_buffer: torch.Tensor | None = None   # GrammarMasks.apply's scratch (CPU logits)
        self.compiles = 0
        self.cache_hits = 0

    # -- compiling (any thread hands work to the pool; the pool runs it) ------------------------

    def key(self, kind: str, spec) -> str:
        """The cache key: a hash of (kind, spec, tokenizer). Order-preserving (property order matters)."""
        text = json.dumps([kind, spec, self.fingerprint], ensure_ascii=False)
        return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()

    def compile(self, kind: str, spec) -> concurrent.futures.Future:
        """A Future of the compiled grammar (a matcher in its start state, which sequences copy); it
        raises StructuredOutputError when the library rejects the constraint."""
        self.in_use = True
        key = self.key(kind, spec)
        with self._lock:
            future = self._cache.get(key)
            if future is not None:
                self._cache.move_to_end(key)
                self.cache_hits += 1
                return future
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(self.max_workers, thread_name_prefix="genq-grammar")
            future = self._pool.submit(self._compile, kind, spec)
            self._cache[key] = future
            self.compiles += 1
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
            return future

    def _tokenizer(self):
        with self._lock:
            if self._ll_tokenizer is None:
                import llguidance.hf
                self._ll_tokenizer = llguidance.hf.from_tokenizer(
                    self.tokenizer, n_vocab=self.vocab_size, eos_token=sorted(self.eos))
            return self._ll_tokenizer

    def _compile(self, kind: str, spec):
        import llguidance

        start = time.perf_counter()
        what = {"json": "JSON schema", "json_object": "JSON", "grammar": "grammar"}.get(kind, kind)
        tokenizer = self._tokenizer()
        make = llguidance.LLMatcher
        try:
            if kind == "json":
                grammar = make.grammar_from_json_schema(spec, defaults=JSON_OPTIONS)
            elif kind == "json_object":
                grammar = make.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
            elif kind == "regex":
                grammar = make.grammar_from_regex(spec)
            elif kind == "choice":
                grammar = make.grammar_from_lark(choice_grammar(spec))
            elif kind == "grammar":
                grammar = make.grammar_from_lark(spec)
            else:
                raise StructuredOutputError(f"unknown structured output kind {kind!r}")
        except (TypeError, ValueError) as exc:
            raise StructuredOutputError(f"invalid {what}: {_clean(str(exc))}") from None
        matcher = make(tokenizer, grammar, log_level=0)      # builds the grammar (drops the GIL)
        if matcher.is_error():
            raise StructuredOutputError(f"invalid {what}: {_clean(matcher.get_error())}")
        log.debug("compiled a %s grammar in %.1f ms", kind, (time.perf_counter() - start) * 1e3)
        return matcher

    # -- matching (the step thread) -------------------------------------------------------------

    def new_state(self, compiled) -> GrammarState:
        return GrammarState(compiled.deep_copy(), self.eos)

    def masks(self, samples) -> GrammarMasks | None:
        """The bitmask of every constrained sample of a step; None when none is constrained."""
        indices = [i for i, (seq, _) in enumerate(samples) if seq.grammar is not None]
        if not indices:
            return None
        bitmask = self._buffer(len(indices))
        matchers = []
        for j, i in enumerate(indices):
            seq = samples[i][0]
            state = seq.grammar
            if state.num_accepted < seq.num_output_tokens:   # catch up on tokens it has not seen (never twice)
                for token in seq.token_ids[seq.num_prompt_tokens + state.num_accepted:]:
                    if not state.accept(token):
                        break
            matchers.append((state.matcher, j))
        # llguidance's own torch helpers would import torch.compile (~0.7 s); these are what they call
        row_bytes = bitmask.shape[1] * 4
        if len(matchers) >= PARALLEL_MASKS_FROM and CPUS >= 4:   # Rust threads pay off there only
            if self._executor is None:
                import llguidance
                self._executor = llguidance.LLExecutor()
            self._executor.unsafe_compute_mask_ptr(matchers, bitmask.data_ptr(), row_bytes, len(matchers))
        else:
            base = bitmask.data_ptr()
            for matcher, j in matchers:
                matcher.unsafe_compute_mask_ptr(base + j * row_bytes, row_bytes)
        dead = {}
        if len(indices) == 1:
            empty = [not bool(bitmask.any())]
        else:
            empty = (bitmask == 0).all(dim=1).tolist()
        for j, i in enumerate(indices):
            matcher = matchers[j][0]
            if empty[j] or matcher.is_error():
                why = _clean(matcher.get_error().split("<state>")[0]) if matcher.is_error() else ""
                dead[i] = "the constraint allows no token here" + (f" ({why})" if why else "")
        return GrammarMasks(indices, bitmask, dead, self._scratch(len(indices)))

    def _buffer(self, rows: int) -> torch.Tensor:
        if self._bitmask is None or self._bitmask.shape[0] < rows:
            self._bitmask = torch.empty((max(rows, 8), (self.vocab_size + 31) // 32), dtype=torch.int32)
        return self._bitmask[:rows]

    def _scratch(self, rows: int) -> torch.Tensor:
        if self._apply_buffer is None or self._apply_buffer.shape[0] < rows:
            self._apply_buffer = torch.empty((max(rows, 8), self.vocab_size), dtype=torch.int32)
        return self._apply_buffer

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


def choice_grammar(choices) -> str:
    """A Lark grammar matching exactly one of the strings (JSON string escapes are Lark's)."""
    return "start: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def _clean(message: str) -> str:
    return " ".join(message.split())[:1000]

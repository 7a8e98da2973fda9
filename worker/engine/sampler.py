"""Turns logits into tokens with each sequence's own sampling params.

Greedy batches take one argmax. Anything else is processed row by row in float32: min_tokens
masking, repetition / presence / frequency penalties, temperature, top-k, top-p, min-p, then a draw
from the sequence's own generator when it has a seed (so a seeded request samples the same tokens
whatever else shares its batch) or from the engine's generator. Structured-output masks (the
grammar's allowed ids, structured.py) come first of all, so greedy, sampling and logprobs all see the
masked distribution; a batch without a constrained sample does not pay for them.
"""
from __future__ import annotations

import torch

from worker.engine.request import Sequence


def seed_generator(seed: int, index: int, device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + index * 0x9E3779B1) % (2 ** 63))
    return g


class Sampler:
    def __init__(self, eos_token_ids: set[int], seed: int, device):
        self.eos_token_ids = sorted(eos_token_ids)
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    def __call__(self, logits: torch.Tensor, samples: list[tuple[Sequence, int]],
                 row_of: list[int], masks=None) -> list[tuple[int | None, dict[int, float] | None]]:
        """logits: [num_rows, vocab] float32; row_of[i]: the row sample i draws from. masks: the
        step's structured.GrammarMasks or None. A sample whose grammar allows no token gets None."""
        seqs = [seq for seq, _ in samples]
        plain = all(self._plain_greedy(s) for s in seqs)
        if plain and masks is None:
            tokens = logits.argmax(dim=-1).tolist()
            return [(tokens[r], None) for r in row_of]
        rows = logits.index_select(0, torch.tensor(row_of, device=logits.device))  # one row per sample
        if masks is not None:
            masks.apply(rows)
        dead = masks.dead if masks is not None else ()
        if plain:
            tokens = rows.argmax(dim=-1).tolist()
            return [(None, None) if i in dead else (t, None) for i, t in enumerate(tokens)]
        return [(None, None) if i in dead else self._sample_row(rows[i], seq) for i, seq in enumerate(seqs)]

    def _plain_greedy(self, seq: Sequence) -> bool:
        p = seq.request.params
        return (p.temperature == 0 and p.logprobs is None and p.repetition_penalty == 1.0
                and p.presence_penalty == 0 and p.frequency_penalty == 0
                and seq.num_output_tokens >= p.min_tokens)

    def _sample_row(self, raw: torch.Tensor, seq: Sequence) -> tuple[int, dict[int, float] | None]:
        p = seq.request.params
        logits = raw.clone()
        if seq.num_output_tokens < p.min_tokens:
            banned = self.eos_token_ids + p.stop_token_ids
            if banned:
                logits[torch.tensor(banned, device=logits.device)] = float("-inf")
                if seq.grammar is not None and not torch.isfinite(logits).any():
                    logits = raw.clone()   # the grammar is complete and allows only EOS: it wins
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(seq.token_ids)), device=logits.device)
            vals = logits[seen]
            logits[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and seq.output_counts:
            ids = torch.tensor(list(seq.output_counts), device=logits.device)
            counts = torch.tensor(list(seq.output_counts.values()), dtype=logits.dtype, device=logits.device)
            logits[ids] -= p.presence_penalty + p.frequency_penalty * counts
        if p.temperature == 0:
            token = int(logits.argmax())
        else:
            token = self._draw(logits / p.temperature, p, seq.generator or self.generator)
        logprobs = None
        if p.logprobs is not None:
            lp = torch.log_softmax(raw, dim=-1)
            top = torch.topk(lp, p.logprobs) if p.logprobs else None
            logprobs = {} if top is None else dict(zip(top.indices.tolist(), top.values.tolist()))
            if seq.grammar is not None:   # fewer allowed ids than asked for: no -inf entries
                logprobs = {t: v for t, v in logprobs.items() if v != float("-inf")}
            logprobs[token] = float(lp[token])
        return token, logprobs

    @staticmethod
    def _draw(logits: torch.Tensor, p, generator: torch.Generator) -> int:
        if p.top_k and p.top_k < logits.numel():
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if p.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            # keep the smallest set whose mass reaches top_p (the token that crosses it included)
            drop = sorted_probs.cumsum(0) - sorted_probs >= p.top_p
            sorted_probs[drop] = 0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        if p.min_p > 0:
            probs = probs.masked_fill(probs < p.min_p * probs.max(), 0)
        return int(torch.multinomial(probs, 1, generator=generator))

"""Turns logits into tokens with each sequence's own sampling params.

Greedy batches take one argmax. Rows that need nothing of their own (no seed, no penalties, no
logprobs, min_tokens reached: what an OpenAI client sends by default) are sampled together, in
whole-batch operations: temperature, top-k, top-p, min-p, then one uniform number per row against
its running sum (at 16 streams of temperature 1 the per-row loop this replaces took ~13 ms, about a
fifth of a decode step, on a 2-core EPYC; together they take ~0.8 ms). Rows under min_tokens have
EOS and their stop ids masked first, in one indexed write for the batch. The others go row by row
(penalties, logprobs, a seed, min_tokens under a grammar): min_tokens masking, repetition /
presence / frequency penalties, then the same filters and draw, from
the sequence's own generator when it has a seed (so a seeded request samples the same tokens whatever
else shares its batch) or from the engine's generator. Structured-output masks (the grammar's allowed
ids, structured.py) come first of all, so greedy, sampling and logprobs all see the masked
distribution; a batch without a constrained sample does not pay for them.
"""
from __future__ import annotations

import torch

from kernels import cpu_kernels
from worker.engine.request import Sequence


TOP_P_CANDIDATES = 256   # top-p first looks among a row's this many most likely tokens


def greedy_ids(rows: torch.Tensor, compiled: bool = True) -> list[int]:
    """Each row's argmax (its first maximum; a NaN counts as the maximum, as argmax has it). On the
    CPU, float32 logits go through the compiled kernel (kernels/cpu_kernels.py argmax_rows: 24 rows of
    a 49,152-token vocabulary 0.19 against 0.50 ms for max(), 2 threads, AMX Xeon); elsewhere through
    max(): the same indices as argmax() in a third of its time on the CPU (PyTorch 2.13: 0.29 against
    0.76 ms, 2 threads). compiled=False: max() only (an engine told to keep to PyTorch's kernels)."""
    if compiled and cpu_kernels.argmax_rows_supports(rows) and cpu_kernels.available():
        return cpu_kernels.argmax_rows(rows)
    return rows.max(dim=-1).indices.tolist()


def seed_generator(seed: int, index: int, device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + index * 0x9E3779B1) % (2 ** 63))
    return g


class Sampler:
    def __init__(self, eos_token_ids: set[int], seed: int, device, compiled: bool = True):
        self.eos_token_ids = sorted(eos_token_ids)
        self.compiled = compiled   # greedy picks may use the compiled CPU kernel (greedy_ids)
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    @torch.inference_mode()   # (the model runner's logits are inference tensors, written in place here)
    def __call__(self, logits: torch.Tensor, samples: list[tuple[Sequence, int]],
                 row_of: list[int], masks=None) -> list[tuple[int | None, dict[int, float] | None]]:
        """logits: [num_rows, vocab] float32, overwritten; row_of[i]: the row sample i draws from.
        masks: the step's structured.GrammarMasks or None. A sample whose grammar allows no token
        gets None."""
        seqs = [seq for seq, _ in samples]
        own = [self._own_row(s) for s in seqs]   # (once a sample: the step's hot path)
        banning = [s.num_output_tokens < s.request.params.min_tokens for s in seqs]
        plain = not any(own) and all(s.request.params.temperature == 0 for s in seqs)
        if plain and masks is None and not any(banning):
            tokens = greedy_ids(logits, self.compiled)
            return [(tokens[r], None) for r in row_of]
        if row_of == list(range(len(logits))):
            rows = logits   # one row per sample already (the caller's, written in place: it is not read again)
        else:
            rows = logits.index_select(0, torch.tensor(row_of, device=logits.device))  # one row per sample
        if masks is not None:
            masks.apply(rows)
        dead = masks.dead if masks is not None else ()
        if plain:
            self._ban_stops(rows, [i for i, b in enumerate(banning) if b and i not in dead], seqs)
            tokens = greedy_ids(rows, self.compiled)
            return [(None, None) if i in dead else (t, None) for i, t in enumerate(tokens)]
        out: list[tuple[int | None, dict[int, float] | None]] = [(None, None)] * len(seqs)
        together: list[int] = []
        for i, seq in enumerate(seqs):
            if i in dead:
                continue
            if seq.generator is None and not own[i]:
                together.append(i)
            else:
                out[i] = self._sample_row(rows[i], seq)
        if together:
            self._ban_stops(rows, [i for i in together if banning[i]], seqs)
            mine = rows if len(together) == len(seqs) else rows[together]   # (a copy: _draw_batch writes it)
            for i, token in zip(together, self._draw_batch(mine, [seqs[i].request.params for i in together])):
                out[i] = (token, None)
        return out

    @staticmethod
    def _own_row(seq: Sequence) -> bool:
        """Whether the row needs work of its own before the draw: logprobs, a penalty, min_tokens
        not reached under a grammar (whose mask may leave only the banned tokens; a seed too, for a
        sampled row: its own generator). min_tokens alone is applied to the batch (_ban_stops)."""
        p = seq.request.params
        return (p.logprobs is not None or p.repetition_penalty != 1.0 or p.presence_penalty != 0
                or p.frequency_penalty != 0 or (seq.grammar is not None and seq.num_output_tokens < p.min_tokens))

    def _ban_stops(self, rows: torch.Tensor, which: list[int], seqs: list[Sequence]) -> None:
        """min_tokens not reached: EOS and the stop token ids of rows[i], i in `which`, to -inf, in
        one indexed write (row by row, with a clone each, this took ~3.5 ms of a 24-row decode step
        on a 2-core Zen 4: a tenth of a bfloat16 step)."""
        if not which:
            return
        row_ids: list[int] = []
        token_ids: list[int] = []
        for i in which:
            banned = self._banned(seqs[i].request.params, rows.shape[1])
            row_ids.extend([i] * len(banned))
            token_ids.extend(banned)
        if token_ids:
            device = rows.device
            rows[torch.tensor(row_ids, device=device), torch.tensor(token_ids, device=device)] = float("-inf")

    def _banned(self, params, vocab: int) -> list[int]:
        """The ids min_tokens bans: EOS and the request's stop token ids (those past the vocabulary
        can never be sampled, so are left out rather than failing the step)."""
        stops = params.stop_token_ids
        return self.eos_token_ids + ([t for t in stops if t < vocab] if stops else [])

    def _draw_batch(self, rows: torch.Tensor, params: list, generator: torch.Generator | None = None) -> list[int]:
        """One token per row of `rows` (float32 logits, overwritten), each by its own temperature /
        top-k / top-p / min-p, drawn with `generator` (default: the engine's); greedy rows
        (temperature 0) take their argmax. Whole-batch operations, in place (each a pass over the
        batch's logits, none a copy of them). The weights stay unnormalised (exp(x - max)); the draw
        is by inverse CDF, one uniform number per row against each row's running sum. Top-p looks
        among each row's TOP_P_CANDIDATES most likely tokens and sorts the whole row only where those
        hold less than its top-p mass (a sort of the vocabulary costs ~1.5 ms a row on a 2-core CPU)."""
        device = rows.device
        greedy = [p.temperature == 0 for p in params]
        best_ids = greedy_ids(rows, self.compiled) if any(greedy) else None
        if all(greedy):
            return best_ids
        x = rows
        x.div_(torch.tensor([p.temperature or 1.0 for p in params], dtype=x.dtype, device=device).unsqueeze(1))
        vocab = x.shape[1]
        top_k = [p.top_k if p.top_k and p.top_k < vocab else 0 for p in params]
        if any(top_k):
            # the k-th largest logit of each row; rows without top-k mask nothing
            kth = x.topk(max(top_k), dim=-1).values.gather(
                1, torch.tensor([max(k, 1) - 1 for k in top_k], device=device).unsqueeze(1))
            kth[torch.tensor([k == 0 for k in top_k], device=device)] = float("-inf")
            x.masked_fill_(x < kth, float("-inf"))
        x.sub_(x.amax(dim=-1, keepdim=True)).exp_()   # weights, the most likely token's 1
        if any(p.top_p < 1.0 for p in params):
            self._top_p(x, [p.top_p for p in params])
        if any(p.min_p > 0 for p in params):
            min_p = torch.tensor([p.min_p for p in params], dtype=x.dtype, device=device).unsqueeze(1)
            x.masked_fill_(x < min_p, 0.0)   # (against the most likely token's weight, 1)
        x.cumsum_(dim=-1)
        totals = x[:, -1]
        if not bool(((totals > 0) & torch.isfinite(totals)).all()):
            # NaN or infinite logits (a broken model or kernel): fail the step's requests visibly
            # rather than draw some token
            raise ValueError("sampling: logits with NaN or infinite values")
        point = torch.rand(len(params), 1, generator=generator or self.generator, dtype=x.dtype, device=device)
        # the first token whose running sum exceeds the point: never one of weight 0
        tokens = torch.searchsorted(x, point.mul_(x[:, -1:]), right=True).clamp_(max=vocab - 1).squeeze(1).tolist()
        if best_ids is not None:
            tokens = [b if g else t for t, b, g in zip(tokens, best_ids, greedy)]
        return tokens

    @staticmethod
    def _top_p(weights: torch.Tensor, top_p: list[float]) -> None:
        """Zero, per row, every token outside the smallest set of most likely tokens whose share of
        the row's weight reaches its top_p (the token that crosses it included); rows with top_p 1
        unchanged. In place."""
        vocab, device = weights.shape[1], weights.device
        bound = torch.tensor(top_p, dtype=weights.dtype, device=device).unsqueeze(1) * weights.sum(dim=-1, keepdim=True)
        values, order = weights.topk(min(TOP_P_CANDIDATES, vocab), dim=-1)
        # (by the same running sum the cut below uses, so rounding cannot make them disagree)
        covered = (values.cumsum(dim=-1)[:, -1:] >= bound).squeeze(1).tolist()
        narrow = [i for i, (c, p) in enumerate(zip(covered, top_p)) if c and p < 1.0]
        wide = [i for i, (c, p) in enumerate(zip(covered, top_p)) if not c and p < 1.0]
        for chosen, candidates in ((narrow, True), (wide, False)):
            if not chosen:
                continue
            index = torch.tensor(chosen, device=device)
            if candidates:
                vals, idx = values.index_select(0, index), order.index_select(0, index)
            else:
                vals, idx = weights.index_select(0, index).sort(dim=-1, descending=True)
            drop = vals.cumsum(dim=-1) - vals >= bound.index_select(0, index)
            weights[index] = torch.zeros(len(chosen), vocab, dtype=weights.dtype, device=device).scatter_(
                1, idx, vals.masked_fill_(drop, 0.0))

    def _sample_row(self, raw: torch.Tensor, seq: Sequence) -> tuple[int, dict[int, float] | None]:
        p = seq.request.params
        logits = raw.clone()
        if seq.num_output_tokens < p.min_tokens:
            banned = self._banned(p, logits.shape[0])
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
        token = self._draw_batch(logits.unsqueeze(0), [p], seq.generator)[0]
        logprobs = None
        if p.logprobs is not None:
            lp = torch.log_softmax(raw, dim=-1)
            top = torch.topk(lp, p.logprobs) if p.logprobs else None
            logprobs = {} if top is None else dict(zip(top.indices.tolist(), top.values.tolist()))
            if seq.grammar is not None:   # fewer allowed ids than asked for: no -inf entries
                logprobs = {t: v for t, v in logprobs.items() if v != float("-inf")}
            logprobs[token] = float(lp[token])
        return token, logprobs

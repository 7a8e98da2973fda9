"""Unified token-budget scheduling (no prefill/decode phases) with preemption by recomputation.

Each step every running sequence catches its computed tokens up to its token count, within
`max_num_batched_tokens` (long prompts are chunked) and `max_num_seqs`. Running sequences go
first, most urgent first; waiting ones are admitted by (priority, arrival) while the budget and
the KV pool allow. When a running sequence cannot get a block, the least urgent, latest running
sequence is preempted: its blocks are freed and it waits to be recomputed from its tokens.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass, field

from worker.engine.config import EngineConfig
from worker.engine.kv_cache_manager import KVCacheManager
from worker.engine.request import Sequence, SeqStatus


@dataclass(slots=True)
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int            # tokens whose KV this step computes


@dataclass(slots=True)
class SchedulerOutput:
    scheduled: list[ScheduledSeq]                  # batch order
    # (sequence, index into `scheduled` whose last token's logits it samples from); forks of a
    # request's first sample share their leader's row
    samples: list[tuple[Sequence, int]]
    block_copies: list[tuple[int, int]]            # copy-on-write (src, dst) before the forward
    num_batched_tokens: int = 0
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: EngineConfig, kv: KVCacheManager, new_sequence):
        self.config = config
        self.kv = kv
        self.new_sequence = new_sequence   # (request, index, token_ids) -> Sequence
        self.waiting: list[tuple[tuple[int, int, int], Sequence]] = []
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        heapq.heappush(self.waiting, (seq.sort_key, seq))

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledSeq] = []
        preempted: list[Sequence] = []
        self.running.sort(key=lambda s: s.sort_key)
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.kv.allocate_slots(seq, n):
                victim = self.running.pop()
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            else:
                scheduled.append(ScheduledSeq(seq, n))
                budget -= n
                i += 1
        # Admitting new work while running work is being preempted would only thrash.
        deferred = []   # requests whose grammar is still compiling wait without blocking the others
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0][1]
            if seq.request.grammar_pending:
                deferred.append(heapq.heappop(self.waiting))
                continue
            cached = self.kv.find_cached_prefix(seq)
            n = min(seq.num_tokens - len(cached) * self.kv.block_size, budget)
            if not self.kv.admit(seq, cached, n):
                break
            heapq.heappop(self.waiting)
            if seq.index == 0 and seq.request.num_cached_tokens == 0:
                seq.request.num_cached_tokens = seq.num_computed_tokens
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            scheduled.append(ScheduledSeq(seq, n))
            budget -= n
        for entry in deferred:
            heapq.heappush(self.waiting, entry)
        samples = []
        for row, item in enumerate(scheduled):
            seq = item.seq
            if seq.num_computed_tokens + item.num_new_tokens < seq.num_tokens:
                continue  # a prompt chunk that does not reach the end: nothing to sample yet
            samples.append((seq, row))
            samples.extend((fork, row) for fork in self._fork(seq, item.num_new_tokens))
        return SchedulerOutput(scheduled, samples, self.kv.take_copies(),
                               self.config.max_num_batched_tokens - budget, preempted)

    def _fork(self, leader: Sequence, num_new_tokens: int) -> list[Sequence]:
        """When the first sample of an n > 1 request finishes its prompt, the others are born
        sharing its blocks; each samples its own first token from the same logits."""
        request = leader.request
        if leader.index != 0 or len(request.seqs) >= request.params.n:
            return []
        forks = []
        for index in range(len(request.seqs), request.params.n):
            child = self.new_sequence(request, index, list(leader.token_ids))
            self.kv.fork(leader, child)
            child.num_computed_tokens = leader.num_computed_tokens + num_new_tokens
            child.status = SeqStatus.RUNNING
            self.running.append(child)
            forks.append(child)
        return forks

    def _preempt(self, seq: Sequence) -> None:
        self.kv.free(seq)
        seq.num_computed_tokens = 0
        self.num_preemptions += 1
        self.add(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Take a sequence out of scheduling and give its blocks back."""
        seq.finish_reason = reason
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SeqStatus.WAITING:
            self.waiting = [(k, s) for k, s in self.waiting if s is not seq]
            heapq.heapify(self.waiting)
        seq.status = SeqStatus.FINISHED
        self.kv.free(seq)

    def stats(self) -> dict:
        return {"running": len(self.running), "waiting": len(self.waiting)}

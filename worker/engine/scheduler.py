"""Unified token-budget scheduling (no prefill/decode phases) with preemption by recomputation.

Each step every running sequence catches its computed tokens up to its token count, within
`max_num_batched_tokens` (long prompts are chunked) and `max_num_seqs`; prompt tokens (prefill,
recomputation) take at most `max_prompt_tokens_per_step` of a step unless one prompt alone has
work, so a burst of prompts is prefilled over several steps that the running streams share instead
of one long step that stalls them all (and its first tokens come out group by group). Running sequences go
first, most urgent first; waiting ones are admitted by (priority, arrival) while the budget and
the KV pool allow. When a running sequence cannot get a block, the least urgent, latest running
sequence is preempted: its blocks are freed and it waits to be recomputed from its tokens.

With `scheduling="fair"` (the default) waiting requests of one priority are admitted by their
tenants' virtual token counters first (fairness.py), arrival second; running sequences are ordered
(and preempted, from the end) the same way. `"fifo"` is (priority, arrival) alone.

With `fair_step_share` on as well, a step that several tenants want work in is limited the way
weighted processor sharing would limit it (fairness.share_limits): a tenant that wants little gets
all it wants, and the step costs at most W / w times what that would cost alone, less where it
wants few tokens against the step's fixed cost (w: its weight, W:
the weights of the tenants wanting; N with equal weights), by the step cost the engine measures
(fairness.StepCost); the others' running sequences beyond their share sit the step out (they keep
their KV blocks). So a tenant with one request running beside another's flood is slowed about N
times, not by the flood's batch width.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from worker.engine.config import EngineConfig
from worker.engine.fairness import W_IN, FairQueue, FifoQueue, StepCost, VirtualTokenCounter, share_limits
from worker.engine.kv_cache_manager import KVCacheManager
from worker.engine.request import SeqStatus, Sequence


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
        self.fair = config.scheduling == "fair"
        self.waiting: FairQueue | FifoQueue = FairQueue() if self.fair else FifoQueue()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.vtc = VirtualTokenCounter()   # charged under "fifo" too (tokens served per tenant)
        self.step_cost = StepCost()        # what the engine's steps cost (LLMEngine.step observes each)
        self.share_steps = self.fair and config.fair_step_share
        # the most tokens a step holds and still runs as one compiled call (CPU; LLMEngine sets it)
        self.one_call_tokens: int | None = None
        self.num_shared_steps = 0          # steps that share_limits limited

    def add(self, seq: Sequence) -> None:
        """A new sequence waits (its tenant turns active, lifted from idle)."""
        self.vtc.arrive(seq.request.tenant)
        self._enqueue(seq)

    def _enqueue(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        self.waiting.push(seq)

    def charge(self, seq: Sequence, prompt_tokens: int, output_tokens: int) -> None:
        """What a step served `seq`: to its tenant's counter."""
        request = seq.request
        self.vtc.charge(request.tenant, request.weight, prompt_tokens, output_tokens)

    def _order(self, seq: Sequence):
        if not self.fair:
            return seq.sort_key
        request = seq.request
        return (request.priority, self.vtc.counter(request.tenant), request.arrival, seq.index)

    def _share_limits(self, budget: int) -> dict[str, int] | None:
        """This step's per-tenant token limits (fair_step_share), or None. Shared among the tenants
        with work at the most urgent priority present: what their running sequences of that priority
        still need, plus the prompt of their first waiting one beyond its cached prefix (not one
        whose grammar is compiling) while a slot is free. Less urgent work of other tenants sits out
        a limited step."""
        if self.vtc.num_active < 2:   # one tenant (the usual case): nothing to share, nothing to compute
            return None
        if not self.step_cost.points():
            return None
        heads = [seq for seq in self.waiting.heads() if not seq.request.grammar_pending] \
            if len(self.running) < self.config.max_num_seqs else []
        candidates = [*self.running, *heads]
        if not candidates:
            return None
        top = min(seq.request.priority for seq in candidates)
        demand: dict[str, int] = {}
        weights: dict[str, float] = {}
        for seq in candidates:
            request = seq.request
            if request.priority == top:
                demand[request.tenant] = demand.get(request.tenant, 0) + self._to_compute(seq)
                weights[request.tenant] = request.weight
        backlogged = {tenant for tenant in demand if self.waiting.queued(top, tenant) > 1}
        allowance = self.config.fair_light_allowance
        return share_limits(demand, weights,
                            lambda d, ratio, light: self.step_cost.cap(d, ratio, budget, allowance if light else None),
                            budget, backlogged, self._light(demand, weights, budget, backlogged))

    def _light(self, demand: dict[str, int], weights: dict[str, float], budget: int,
               backlogged: set[str]) -> set[str]:
        """The tenants owed a shared step's whole prompt (share_limits' `light`): those holding at
        most half their weight's part of the engine's sequences (a key with a job or two
        beside a flood) whose counter is at most a step's budget above the smallest other counter
        among the tenants wanting work (served no more than the others, by the Virtual Token
        Counter, give or take one step: so a long prompt gets a step or two whole, then shares),
        and with no second prompt waiting (`backlogged` tenants share by weight alone)."""
        wanting = {tenant: weights.get(tenant, 1.0) for tenant, d in demand.items() if d > 0}
        if len(wanting) < 2:   # (nothing is shared)
            return set()
        total = sum(wanting.values())
        counters = {tenant: self.vtc.counter(tenant) for tenant in wanting}
        first, second = sorted(counters.values())[:2]   # the smallest other counter: `second` for the smallest
        light = set()
        for tenant, weight in wanting.items():
            if tenant in backlogged or self.vtc.sequences(tenant) * 2 > self.config.max_num_seqs * weight / total:
                continue
            if counters[tenant] <= (second if counters[tenant] == first else first) + W_IN * budget / weight:
                light.add(tenant)
        return light

    def _to_compute(self, seq: Sequence) -> int:
        """The tokens `seq` still has to compute: a waiting one's prompt without the prefix it will
        find cached. (Counted whole, a cached prompt made a step look as if it fitted: the shares
        went unlimited, the light tenant's prompt took a few tokens and the flood's prompts the rest
        of the budget, a step several times the bound.)"""
        if seq.status is SeqStatus.WAITING:
            return seq.num_tokens - self.kv.cached_prefix_tokens(seq)
        return seq.num_tokens - seq.num_computed_tokens

    def observe_step(self, tokens: int, seconds: float) -> None:
        """A step of `tokens` tokens took `seconds` (forward and sampling): for the step cost model."""
        self.step_cost.observe(tokens, seconds)

    def schedule(self) -> SchedulerOutput:
        self.running.sort(key=self._order)
        limits = self._share_limits(self.config.max_num_batched_tokens) if self.share_steps else None
        out = self._schedule(limits)
        if limits is not None:
            if out.empty and not out.preempted:   # (cannot happen with a token for every tenant; never spin)
                return self._schedule(None)
            self.num_shared_steps += 1
        return out

    def _schedule(self, limits: dict[str, int] | None) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        prompt_budget = self._prompt_budget()
        capped = prompt_budget != float("inf")   # (else no need to tell prompts from decode rows)
        scheduled: list[ScheduledSeq] = []
        preempted: list[Sequence] = []
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            prompt = capped and not _decoding(seq)
            if prompt:
                n = min(n, prompt_budget)
            if limits is not None:
                n = min(n, limits.get(seq.request.tenant, 0))
            if n <= 0:   # its tenant's share, or the step's prompt tokens, are spent: it sits the step out
                i += 1
                continue
            while not self.kv.allocate_slots(seq, n):
                victim = self.running.pop()
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            else:
                scheduled.append(ScheduledSeq(seq, n))
                budget -= n
                if prompt:
                    prompt_budget -= n
                if limits is not None:
                    limits[seq.request.tenant] -= n
                i += 1
        # Admitting new work while running work is being preempted would only thrash.
        deferred = []   # requests whose grammar is still compiling wait without blocking the others
        # under "fair", this step's prompt tokens count toward the choice before they are charged, so
        # one step's admissions alternate between tenants rather than all going to the lowest counter
        planned: dict[str, float] = {}
        if self.fair:
            for item in scheduled:
                self._plan(planned, item)
        score = (lambda tenant: self.vtc.counter(tenant) + planned.get(tenant, 0.0)) if self.fair else None
        if limits is not None:   # a tenant whose share is spent comes last, and is not admitted
            counter = score
            score = lambda tenant: counter(tenant) if limits.get(tenant, 0) > 0 else float("inf")
        while (not preempted and self.waiting and min(budget, prompt_budget) > 0
               and len(self.running) < self.config.max_num_seqs):
            seq = self.waiting.peek(score)
            if limits is not None and limits.get(seq.request.tenant, 0) <= 0:
                break
            if seq.request.grammar_pending:
                self.waiting.pop(seq)
                deferred.append(seq)
                continue
            cached = self.kv.find_cached_prefix(seq)
            n = min(seq.num_tokens - len(cached) * self.kv.block_size, budget, prompt_budget)
            if limits is not None:
                n = min(n, limits[seq.request.tenant])
            if not self.kv.admit(seq, cached, n):
                break
            self.waiting.pop(seq)
            if seq.index == 0 and seq.request.num_cached_tokens == 0:
                seq.request.num_cached_tokens = seq.num_computed_tokens
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            scheduled.append(ScheduledSeq(seq, n))
            budget -= n
            prompt_budget -= n
            if limits is not None:
                limits[seq.request.tenant] -= n
            if self.fair:
                self._plan(planned, scheduled[-1])
        for seq in deferred:
            self.waiting.push(seq)
        samples = []
        for row, item in enumerate(scheduled):
            seq = item.seq
            if seq.num_computed_tokens + item.num_new_tokens < seq.num_tokens:
                continue  # a prompt chunk that does not reach the end: nothing to sample yet
            samples.append((seq, row))
            samples.extend((fork, row) for fork in self._fork(seq, item.num_new_tokens))
        return SchedulerOutput(scheduled, samples, self.kv.take_copies(),
                               self.config.max_num_batched_tokens - budget, preempted)

    def _prompt_budget(self) -> int | float:
        """Prompt tokens this step may take: `max_prompt_tokens_per_step`, unless one prompt alone
        has work (nothing decodes, no other prompt waits or is part way): that one takes what the
        step's budget allows, its first token soonest. Where what the decoding rows leave of
        `one_call_tokens` is less than the cap but at least half of it, that: the step then runs as
        one compiled call (on a 2-core EPYC, 113 prompt tokens beside 15 decode rows took 164 ms
        where 128 beside them, op by op, took 214: 1.11 against 1.38 ms a prompt token)."""
        cap = self.config.max_prompt_tokens_per_step
        if cap is None:
            return float("inf")
        decoding = sum(1 for seq in self.running if _decoding(seq))
        if not decoding and len(self.waiting) + len(self.running) <= 1:
            return float("inf")
        fit = (self.one_call_tokens or 0) - decoding
        return fit if max(cap // 2, 1) <= fit < cap else cap   # (never 0: prompts always move)

    @staticmethod
    def _plan(planned: dict[str, float], item: ScheduledSeq) -> None:
        request = item.seq.request
        planned[request.tenant] = planned.get(request.tenant, 0.0) + W_IN * item.num_new_tokens / request.weight

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
            child.charged_prompt_tokens = child.num_computed_tokens   # the leader's prompt: charged to it
            self.vtc.arrive(request.tenant)
            self.running.append(child)
            forks.append(child)
        return forks

    def _preempt(self, seq: Sequence) -> None:
        self.kv.free(seq)
        seq.num_computed_tokens = 0
        self.num_preemptions += 1
        self._enqueue(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Take a sequence out of scheduling and give its blocks back."""
        seq.finish_reason = reason
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SeqStatus.WAITING:
            self.waiting.remove(seq)
        if seq.status is not SeqStatus.FINISHED:
            self.vtc.leave(seq.request.tenant)
        seq.status = SeqStatus.FINISHED
        self.kv.free(seq)

    def stats(self) -> dict:
        return {"running": len(self.running), "waiting": len(self.waiting)}


def _decoding(seq: Sequence) -> bool:
    """`seq` is past its prompt and has one token (its last sampled one) to compute."""
    return seq.num_output_tokens > 0 and seq.num_computed_tokens == seq.num_tokens - 1

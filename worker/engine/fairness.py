"""Fair sharing between tenants: the Virtual Token Counter (VTC; Sheng et al., "Fairness in Serving
Large Language Models", OSDI 2024) and the waiting queues the scheduler admits from.

Each tenant has a counter of the service it received: every prompt token computed for it adds
`W_IN / weight`, every output token `W_OUT / weight`. Among waiting requests of the same priority the
scheduler admits the one of the tenant with the smallest counter (FIFO within a tenant). A tenant
that turns backlogged after being idle is lifted to the smallest counter among the active tenants
(or, with none, to the counter of the last one that left), so idling banks no credit. With one
tenant alone, it gets everything.

`FifoQueue` is the `scheduling="fifo"` queue: (priority, arrival) only, as before fair sharing.
"""
from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Iterator

from worker.engine.request import Sequence

W_IN = 1.0           # a prompt (prefill) token's cost
W_OUT = 2.0          # an output token's cost (decode is the dearer work per token)


class VirtualTokenCounter:
    """The counters, and which tenants are active (have a sequence waiting or running)."""

    def __init__(self) -> None:
        self.counters: dict[str, float] = {}
        self.served: dict[str, int] = {}       # tenant -> tokens served (prompt computed + output), unweighted
        self._active: dict[str, int] = {}      # tenant -> its sequences in the scheduler
        self._floor = 0.0                      # the counter of the last tenant to leave, when none is active

    def counter(self, tenant: str) -> float:
        return self.counters.get(tenant, 0.0)

    def is_active(self, tenant: str) -> bool:
        return tenant in self._active

    @property
    def num_active(self) -> int:
        return len(self._active)

    def arrive(self, tenant: str) -> None:
        """One more sequence of `tenant` in the scheduler; lift it when it comes back from idle."""
        if tenant not in self._active:
            if self._active:
                floor = min(self.counter(t) for t in self._active)
            else:
                floor = self._floor
            self.counters[tenant] = max(self.counter(tenant), floor)
            self._active[tenant] = 0
        self._active[tenant] += 1

    def leave(self, tenant: str) -> None:
        """One sequence of `tenant` left the scheduler (finished or aborted)."""
        left = self._active[tenant] - 1
        if left:
            self._active[tenant] = left
            return
        del self._active[tenant]
        if not self._active:
            self._floor = max(self._floor, self.counter(tenant))

    def charge(self, tenant: str, weight: float, prompt_tokens: int, output_tokens: int) -> None:
        if not prompt_tokens and not output_tokens:
            return
        self.counters[tenant] = self.counter(tenant) + (W_IN * prompt_tokens + W_OUT * output_tokens) / weight
        self.served[tenant] = self.served.get(tenant, 0) + prompt_tokens + output_tokens


class FifoQueue:
    """Waiting sequences by (priority, arrival, sample)."""

    def __init__(self) -> None:
        self._heap: list[tuple[tuple[int, int, int], Sequence]] = []

    def push(self, seq: Sequence) -> None:
        heapq.heappush(self._heap, (seq.sort_key, seq))

    def peek(self, score: Callable[[str], float] | None = None) -> Sequence:
        return self._heap[0][1]

    def pop(self, seq: Sequence) -> None:
        """Take out `seq`, which `peek` has just returned."""
        assert self._heap[0][1] is seq
        heapq.heappop(self._heap)

    def remove(self, seq: Sequence) -> None:
        self._heap = [(k, s) for k, s in self._heap if s is not seq]
        heapq.heapify(self._heap)

    def __len__(self) -> int:
        return len(self._heap)

    def __iter__(self) -> Iterator[Sequence]:
        return (s for _, s in sorted(self._heap, key=lambda entry: entry[0]))


class FairQueue:
    """Waiting sequences by priority, then tenant (the caller's `score`: the smallest first), then
    arrival; a FIFO heap per (priority, tenant)."""

    def __init__(self) -> None:
        self._levels: dict[int, dict[str, list[tuple[tuple[int, int], Sequence]]]] = {}
        self._len = 0

    def push(self, seq: Sequence) -> None:
        request = seq.request
        tenants = self._levels.setdefault(request.priority, {})
        heapq.heappush(tenants.setdefault(request.tenant, []), ((request.arrival, seq.index), seq))
        self._len += 1

    def peek(self, score: Callable[[str], float] | None = None) -> Sequence:
        tenants = self._levels[min(self._levels)]
        score = score or (lambda tenant: 0.0)
        best = min(tenants.items(), key=lambda item: (score(item[0]), item[1][0][0]))
        return best[1][0][1]

    def pop(self, seq: Sequence) -> None:
        request = seq.request
        heap = self._levels[request.priority][request.tenant]
        assert heap[0][1] is seq
        heapq.heappop(heap)
        self._len -= 1
        self._drop_if_empty(request.priority, request.tenant)

    def remove(self, seq: Sequence) -> None:
        request = seq.request
        heap = self._levels.get(request.priority, {}).get(request.tenant)
        if heap is None:
            return
        kept = [(k, s) for k, s in heap if s is not seq]
        if len(kept) == len(heap):
            return
        heapq.heapify(kept)
        self._levels[request.priority][request.tenant] = kept
        self._len -= 1
        self._drop_if_empty(request.priority, request.tenant)

    def heads(self) -> Iterator[Sequence]:
        """The first waiting sequence of each tenant at the most urgent priority."""
        if self._levels:
            yield from (heap[0][1] for heap in self._levels[min(self._levels)].values())

    def _drop_if_empty(self, priority: int, tenant: str) -> None:
        tenants = self._levels[priority]
        if not tenants[tenant]:
            del tenants[tenant]
            if not tenants:
                del self._levels[priority]

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[Sequence]:
        entries = [(priority, key, seq) for priority, tenants in self._levels.items()
                   for heap in tenants.values() for key, seq in heap]
        return (seq for _, _, seq in sorted(entries, key=lambda e: (e[0], e[1])))


class StepCost:
    """What a step costs the engine: seconds ~ fixed + per_token x tokens, fitted by least squares to
    the recent steps (exponentially weighted, half-life `half_life` steps). `fixed_tokens` is the
    ratio fixed / per_token: how many tokens' work a step costs before its first token (on a CPU
    the pass over the weights, ~10 tokens of a 135M model; on a GPU far more)."""

    MIN_STEPS = 8        # steps before the fit is trusted
    SKIP_STEPS = 2       # the engine's first steps (kernel builds, cold caches) are not typical: ignored

    def __init__(self, half_life: float = 64.0) -> None:
        self._decay = 0.5 ** (1.0 / half_life)
        self._n = self._x = self._y = self._xx = self._xy = 0.0
        self.steps = 0                     # steps fitted
        self._skipped = 0

    def observe(self, tokens: int, seconds: float) -> None:
        if self._skipped < self.SKIP_STEPS:
            self._skipped += 1
            return
        d = self._decay
        self.steps += 1
        self._n = self._n * d + 1.0
        self._x = self._x * d + tokens
        self._y = self._y * d + seconds
        self._xx = self._xx * d + tokens * tokens
        self._xy = self._xy * d + tokens * seconds

    def fit(self) -> tuple[float, float] | None:
        """(fixed seconds, seconds per token), or None while the steps seen are too few or all of
        one size (nothing tells the two costs apart)."""
        if self.steps < self.MIN_STEPS:
            return None
        mx, my = self._x / self._n, self._y / self._n
        var = self._xx / self._n - mx * mx
        if var < 1.0:
            return None
        per_token = (self._xy / self._n - mx * my) / var
        return my - per_token * mx, per_token

    def fixed_tokens(self) -> float | None:
        """fixed / per_token (>= 0); inf where a token costs nothing measurable; None: no fit yet, or
        none a line explains (a negative fixed cost: time growing faster than the tokens, as long
        prompts' attention does; limiting steps by it would make them needlessly narrow)."""
        fit = self.fit()
        if fit is None:
            return None
        fixed, per_token = fit
        if per_token * self._x <= 1e-3 * self._y:   # the tokens cost under 0.1% of the steps' time
            return float("inf")
        if fixed < 0.0:
            return None
        return fixed / per_token


def share_limits(demand: dict[str, int], weights: dict[str, float], fixed_tokens: float,
                 budget: int) -> dict[str, int] | None:
    """Per-tenant token limits for one step, so that no tenant in it is slowed more than weighted
    processor sharing would slow it. A tenant of weight w, among tenants of total weight W wanting
    work, is owed w / W of the engine. A step carries all the d tokens it wants plus, for the others,
    (W / w - 1) times the larger of d and `fixed_tokens` (the step's fixed cost in units of a token):
    token for token by weight where d is large, the fixed cost's worth where it is small. Either way
    the step costs at most W / w times what those d tokens would cost alone (fixed + d); where d is
    small against the fixed cost, less, because a key whose jobs run slower has more of them in flight
    (one job every 2 s taking 8 s instead of 4 is 4 jobs a step instead of 2), so a bound of exactly
    W / w a step would slow each of its jobs by more than W / w. The step holds at most the min over
    tenants of d + (W / w - 1) max(d, fixed). Those are water-filled by weight (the smallest demand
    per weight first: each its demand, or its weight's part of what is left), and every tenant gets
    at least one token, so none waits out a whole run of shared steps (the step may then exceed the
    bound by a token per tenant). None where nothing is limited (one tenant, or the step fits
    anyway). `demand`: tenant -> tokens it could use this step; `weights`: tenant -> weight (1 where
    missing)."""
    wanting = {t: min(d, budget) for t, d in demand.items() if d > 0}
    if len(wanting) < 2 or not math.isfinite(fixed_tokens):
        return None
    weight = {t: weights.get(t, 1.0) for t in wanting}
    total = sum(weight.values())
    cap = min(float(budget), min(d + (total / weight[t] - 1) * max(d, fixed_tokens) for t, d in wanting.items()))
    if cap >= sum(wanting.values()):
        return None
    limits: dict[str, int] = {}
    left, weight_left = cap, total
    for tenant, want in sorted(wanting.items(), key=lambda item: item[1] / weight[item[0]]):
        share = min(want, max(1, math.floor(left * weight[tenant] / weight_left + 1e-9)))
        limits[tenant] = share
        left = max(left - share, 0.0)
        weight_left -= weight[tenant]
    return limits

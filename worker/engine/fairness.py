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
from collections.abc import Callable, Container, Iterator

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

    def sequences(self, tenant: str) -> int:
        """`tenant`'s sequences in the scheduler (waiting or running)."""
        return self._active.get(tenant, 0)

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

    def queued(self, priority: int, tenant: str) -> int:
        """How many sequences of `tenant` wait at `priority`."""
        return len(self._levels.get(priority, {}).get(tenant, ()))

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
    """What a step costs the engine, as a function of its tokens, learned from the engine's own steps.

    A line fitted through all steps (the first way this was done) is wrong where it matters: a CPU
    engine's steps are not linear in their tokens. A decode row costs more than a prompt token (its
    own attention pass and sampling), and a step's fixed cost is paid once however few rows it has,
    so a line through a flood's steps (16 decode rows and a 256-token prompt chunk) put a one-row
    step at twice what it takes (measured on an AVX-512 EPYC: 37-50 ms against 19-23 ms), and let
    the flood's rows into a light tenant's steps at three times the bound.

    So the steps are kept by size, in buckets of powers of two (1, 2-3, 4-7, ...), each the recent
    mean of its steps' tokens and seconds (exponentially weighted over its own steps: a size the
    engine stops running keeps its last figures); the cost of `n` tokens is read off the line
    through the buckets' means (made non-decreasing), extended past the largest by its end segment
    and held flat below the smallest (the fixed cost is taken as the smallest step's). The worker's
    warm-up runs steps of one to four rows so the small end is known before the first flood
    (worker/runtime.py: warm_up)."""

    MIN_STEPS = 8        # steps before the curve is trusted
    SKIP_STEPS = 2       # the engine's first steps (kernel builds, cold caches) are not typical: ignored
    MIN_BUCKET_STEPS = 2  # a bucket's mean counts once this many of its steps were seen

    def __init__(self, half_life: float = 16.0) -> None:
        self._decay = 0.5 ** (1.0 / half_life)
        # bit length of a step's tokens -> [weight, tokens sum, seconds sum, steps seen]
        self._buckets: dict[int, list[float]] = {}
        self.steps = 0                                # steps observed (after the skipped ones)
        self._skipped = 0
        self._points: list[tuple[float, float]] | None = None   # the curve's points, cached until the next step
        self._fixed_cache: tuple[int, float, int] | None = None  # (budget, fixed, its worth in tokens), likewise

    def observe(self, tokens: int, seconds: float) -> None:
        if tokens <= 0:
            return
        if self._skipped < self.SKIP_STEPS:
            self._skipped += 1
            return
        self.steps += 1
        bucket = self._buckets.setdefault(tokens.bit_length(), [0.0, 0.0, 0.0, 0])
        d = self._decay
        bucket[0] = bucket[0] * d + 1.0
        bucket[1] = bucket[1] * d + tokens
        bucket[2] = bucket[2] * d + seconds
        bucket[3] += 1
        self._points = self._fixed_cache = None

    def points(self) -> list[tuple[float, float]]:
        """The curve: (tokens, seconds) at each bucket's mean, by tokens, seconds made non-decreasing
        (a larger step never costs less; noise between neighbours would otherwise say so). Empty
        while fewer than MIN_STEPS steps or two buckets are known."""
        if self._points is None:
            points: list[tuple[float, float]] = []
            if self.steps >= self.MIN_STEPS:
                for key in sorted(self._buckets):
                    weight, tokens, seconds, count = self._buckets[key]
                    if count >= self.MIN_BUCKET_STEPS:
                        y = seconds / weight
                        points.append((tokens / weight, max(y, points[-1][1]) if points else y))
            self._points = points if len(points) >= 2 else []
        return self._points

    def cost(self, tokens: float) -> float | None:
        """Seconds a step of `tokens` tokens takes; None while the curve is unknown. Below the
        smallest step seen, what that step took: a line through the two smallest extended to zero
        tokens can come out at zero (two noisy warm-up means), and a zero fixed cost would hold
        every other tenant to a token a step."""
        points = self.points()
        if not points:
            return None
        if tokens <= points[0][0]:
            return points[0][1]
        i = 1
        while i < len(points) - 1 and points[i][0] < tokens:
            i += 1
        (x0, y0), (x1, y1) = points[i - 1], points[i]
        return y0 + (y1 - y0) * (tokens - x0) / (x1 - x0)

    def cap(self, tokens: int, ratio: float, budget: int, light: float | None = None) -> int | None:
        """The most tokens a step may hold when a tenant that wants `tokens` is owed 1 / `ratio` of
        the engine: the step costs at most what those tokens cost alone, plus `ratio - 1` times the
        larger of their own cost beyond the fixed cost and the fixed cost (the cost of the smallest
        step), so the others get the tenant's tokens' worth by weight where it wants many and the
        fixed cost's worth where it wants few; and it holds at most `tokens + (ratio - 1) x
        max(tokens, f)` tokens, f the tokens a step holds for twice the fixed cost (the fixed cost's
        worth). On a line the two nearly agree; on measured steps the second keeps a large demand
        (a prompt) token for token by weight, where the curve's middle mixes steps of prompt chunks
        and decode rows and can say a step of 256 tokens costs less than twice one of 80. At least
        min(tokens, budget), at most `budget`; None while the curve is unknown.

        `light` (a fraction a, not None for a tenant served less than the others: share_limits)
        owes them a times the fixed cost's worth whatever it wants, a prompt as a decode row: its
        step costs what its tokens cost alone plus `(ratio - 1) x a` times the fixed cost, and holds
        at most `tokens + (ratio - 1) x a x f`."""
        tokens = min(tokens, budget)
        alone = self.cost(tokens)
        if alone is None:
            return None
        fixed, fixed_worth = self._fixed(budget)
        owed = light * fixed if light is not None else max(alone - fixed, fixed)
        owed_tokens = light * fixed_worth if light is not None else max(tokens, fixed_worth)
        by_cost = self._most_within((alone + (ratio - 1.0) * owed) * (1.0 + 1e-9), tokens, budget)
        return min(by_cost, math.floor(tokens + (ratio - 1.0) * owed_tokens + 1e-9))

    def _fixed(self, budget: int) -> tuple[float, int]:
        """(the fixed cost, the tokens a step holds for twice it), kept until the next step."""
        if self._fixed_cache is None or self._fixed_cache[0] != budget:
            fixed = self.cost(0)
            self._fixed_cache = (budget, fixed, self._most_within(2.0 * fixed * (1.0 + 1e-9), 0, budget))
        return self._fixed_cache[1], self._fixed_cache[2]

    def _most_within(self, seconds: float, least: int, budget: int) -> int:
        """The most tokens (from `least`, which fits, up to `budget`) a step may hold costing at most `seconds`."""
        if self.cost(budget) <= seconds:
            return budget
        lo, hi = least, budget      # cost(lo) <= seconds < cost(hi)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.cost(mid) <= seconds:
                lo = mid
            else:
                hi = mid
        return lo


def share_limits(demand: dict[str, int], weights: dict[str, float], cap: Callable[[int, float, bool], int],
                 budget: int, backlogged: Container[str] = (), light: Container[str] = ()) -> dict[str, int] | None:
    """Per-tenant token limits for one step, so that no tenant in it is slowed more than weighted
    processor sharing would slow it. A tenant of weight w, among tenants of total weight W wanting
    work, is owed w / W of the engine. `cap(d, W / w)` says how many tokens a step may hold beside
    all the d tokens such a tenant wants (StepCost.cap: at most W / w times what those d tokens cost
    alone, and less where d is small against the step's fixed cost, because a key whose jobs run
    slower has more of them in flight: one job every 2 s taking 8 s instead of 4 is 4 jobs a step
    instead of 2, so a bound of exactly W / w a step would slow each of its jobs by more than W / w).
    The step holds at most the least of those caps over the tenants. Those tokens are water-filled
    by weight (the smallest demand per weight first: each its demand, or its weight's part of what
    is left), and every tenant gets at least one token, so none waits out a whole run of shared
    steps (the step may then exceed the bound by a token per tenant). A tenant that wants more than
    its part, and has nothing waiting beyond it (not in `backlogged`), gets all it wants where the
    tenants after it still keep half their part: a light tenant's prompt a little over its half of
    the budget is then computed in one step, not in two (each as long as the bound allows, and
    every running job of that tenant waiting out both). Backlogged tenants share by weight alone.
    A `light` tenant (one served less than the others, with few requests: the scheduler says which)
    owes the others only a part (the engine's `fair_light_allowance`) of the fixed cost's worth of a
    step (`cap(d, W / w, True)`), a prompt as a decode row: it goes first and gets all it wants
    where the later tenants keep a token each (all but those where the budget binds), so
    its prompt costs it little more than alone (the Virtual Token Counter serves the tenant served
    least first; a shared step is how an engine that batches can). None where nothing is limited
    (one tenant, or the step fits anyway). `demand`: tenant -> tokens it could use this step;
    `weights`: tenant -> weight (1 where missing)."""
    wanting = {t: min(d, budget) for t, d in demand.items() if d > 0}
    if len(wanting) < 2:
        return None
    weight = {t: weights.get(t, 1.0) for t in wanting}
    total = sum(weight.values())
    most = min(budget, min(cap(d, total / weight[t], t in light) for t, d in wanting.items()))
    if most >= sum(wanting.values()):
        return None
    limits: dict[str, int] = {}
    left, weight_left = float(most), total
    order = sorted(wanting.items(), key=lambda item: (item[0] not in light, item[1] / weight[item[0]]))
    for k, (tenant, want) in enumerate(order):
        share = min(want, max(1, math.floor(left * weight[tenant] / weight_left + 1e-9)))
        later = len(order) - k - 1
        if share < want and tenant in light:
            # all it wants where the rest keeps a token a tenant, or where the budget (not another
            # tenant's bound) is what binds, all but those tokens
            if want <= left - later or most >= budget:
                share = max(share, min(want, math.floor(left + 1e-9) - later))
        elif share < want and later and tenant not in backlogged:
            # it may finish instead, if the later tenants keep half their part of what is left
            keep = max(later, math.ceil(left * (weight_left - weight[tenant]) / weight_left / 2 - 1e-9))
            if want <= left - keep:
                share = want
        limits[tenant] = share
        left = max(left - share, 0.0)
        weight_left -= weight[tenant]
    return limits

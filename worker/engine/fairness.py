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

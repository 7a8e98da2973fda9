"""Fair sharing between tenants (worker/engine/fairness.py): the virtual token counters, and the
engine's admission order under "fair" and "fifo"."""
import math
import random

import pytest

from tests.engine.conftest import hf_greedy
from tests.engine.test_scheduler import finish_step, new_sequence
from worker.engine import LLMEngine, SamplingParams
from worker.engine.config import EngineConfig
from worker.engine.fairness import W_IN, W_OUT, FairQueue, StepCost, VirtualTokenCounter, share_limits
from worker.engine.kv_cache_manager import KVCacheManager
from worker.engine.request import InvalidWeightError, Request
from worker.engine.scheduler import Scheduler

# -- the policy on exact counters -----------------------------------------------------------------

def test_counters_charge_weighted_tokens_divided_by_the_weight():
    assert (W_IN, W_OUT) == (1, 2)
    vtc = VirtualTokenCounter()
    vtc.arrive("a")
    vtc.arrive("b")
    vtc.charge("a", 1.0, prompt_tokens=10, output_tokens=3)   # 10 * 1 + 3 * 2
    vtc.charge("b", 2.0, prompt_tokens=10, output_tokens=3)   # the same service at weight 2 counts half
    vtc.charge("b", 2.0, prompt_tokens=0, output_tokens=1)
    assert vtc.counters == {"a": 16.0, "b": 9.0}
    assert vtc.served == {"a": 13, "b": 14}


def test_a_tenant_back_from_idle_is_lifted_to_the_smallest_active_counter():
    vtc = VirtualTokenCounter()
    for tenant in ("a", "b", "c"):
        vtc.arrive(tenant)
    vtc.charge("a", 1.0, 100, 0)
    vtc.charge("b", 1.0, 40, 0)
    vtc.leave("c")                       # idle at 0 while the others are served
    vtc.charge("b", 1.0, 20, 0)
    vtc.arrive("c")                      # no banked credit: up to min(a=100, b=60)
    assert vtc.counter("c") == 60.0
    vtc.leave("a")
    vtc.arrive("a")                      # a counter above the others' is kept (no lift down)
    assert vtc.counter("a") == 100.0
    vtc.arrive("a")                      # a second sequence of an active tenant: no lift at all
    assert vtc.counters == {"a": 100.0, "b": 60.0, "c": 60.0}


def test_with_no_tenant_active_a_newcomer_starts_from_the_last_to_leave():
    vtc = VirtualTokenCounter()
    vtc.arrive("a")
    vtc.charge("a", 1.0, 500, 0)
    vtc.leave("a")
    vtc.arrive("b")
    assert vtc.counter("b") == 500.0


def _request(rid, tenant, priority=0, n_tokens=4, weight=1.0):
    return Request(rid, None, list(range(100, 100 + n_tokens)), SamplingParams(max_tokens=8), priority,
                   tenant=tenant, weight=weight)


def test_fair_queue_orders_by_priority_then_counter_then_arrival():
    q = FairQueue()
    seqs = {}
    for rid, tenant, priority in [("a1", "a", 0), ("a2", "a", 0), ("b1", "b", 0), ("c1", "c", 1), ("b2", "b", 0)]:
        seqs[rid] = new_sequence(_request(rid, tenant, priority), 0, [1, 2])
        q.push(seqs[rid])
    counters = {"a": 5.0, "b": 5.0, "c": 0.0}
    order = []
    while len(q):
        seq = q.peek(counters.__getitem__)
        q.pop(seq)
        order.append(seq.request.request_id)
        counters[seq.request.tenant] += 10     # as if served
    # equal counters: the earlier head (a1) first; then b; then a, then b again; priority 1 last
    assert order == ["a1", "b1", "a2", "b2", "c1"]


def _scheduler(scheduling="fair", num_blocks=64, block_size=4, **cfg):
    config = EngineConfig(block_size=block_size, scheduling=scheduling, **cfg)
    return Scheduler(config, KVCacheManager(num_blocks, block_size), new_sequence)


def test_scheduler_admits_the_smallest_counter_first_and_interleaves_one_step():
    s = _scheduler(max_num_seqs=3)
    for i in range(3):
        s.add(new_sequence(_request(f"a{i}", "a"), 0, list(range(4))))
    s.vtc.charge("a", 1.0, 3, 0)          # a is ahead by 3
    for i in range(3):
        s.add(new_sequence(_request(f"b{i}", "b"), 0, list(range(4))))
    assert s.vtc.counter("b") == 3.0      # lifted to a's counter on arrival
    out = s.schedule()
    # tie at 3: a0 arrived first; a's planned 4 tokens then make b the smaller twice over
    assert [i.seq.request.request_id for i in out.scheduled] == ["a0", "b0", "a1"]


def test_preemption_under_fair_takes_the_largest_counter_of_the_lowest_priority():
    s = _scheduler(num_blocks=4, max_num_batched_tokens=64)
    s.add(new_sequence(_request("rich", "rich", n_tokens=7), 0, list(range(7))))
    s.add(new_sequence(_request("poor", "poor", n_tokens=7), 0, list(range(7))))
    finish_step(s, s.schedule())
    finish_step(s, s.schedule())
    s.vtc.charge("rich", 1.0, 100, 0)
    out = s.schedule()                    # each needs a third block: the richer tenant, though earlier, goes
    assert [p.request.request_id for p in out.preempted] == ["rich"]
    fifo = _scheduler("fifo", num_blocks=4, max_num_batched_tokens=64)
    fifo.add(new_sequence(_request("rich", "rich", n_tokens=7), 0, list(range(7))))
    fifo.add(new_sequence(_request("poor", "poor", n_tokens=7), 0, list(range(7))))
    finish_step(fifo, fifo.schedule())
    finish_step(fifo, fifo.schedule())
    fifo.vtc.charge("rich", 1.0, 100, 0)
    assert [p.request.request_id for p in fifo.schedule().preempted] == ["poor"]   # the latest, as before


def test_weight_and_scheduling_are_checked():
    with pytest.raises(InvalidWeightError):
        _request("x", "a", weight=0)
    with pytest.raises(ValueError, match="weight"):
        _request("x", "a", weight=float("nan"))
    with pytest.raises(ValueError, match="scheduling"):
        EngineConfig(scheduling="lottery")
    for allowance in (0, -0.5, 1.5, float("nan")):
        with pytest.raises(ValueError, match="fair_light_allowance"):
            EngineConfig(fair_light_allowance=allowance)
    assert _request("x", None).tenant == ""


# -- shared steps (fair_step_share): processor sharing within a step ------------------------------

def _linear(fixed_tokens: float):
    """The cap a step cost of `fixed + per_token x tokens` gives (fixed = `fixed_tokens` tokens' worth):
    d + (ratio - 1) max(d, fixed_tokens); for a light tenant (`light`: True, or its allowance a)
    d + (ratio - 1) a fixed_tokens."""
    def cap(d, ratio, light=None):
        if light is None or light is False:
            return d + (ratio - 1) * max(d, fixed_tokens)
        return d + (ratio - 1) * float(light) * fixed_tokens
    return cap


def test_step_cost_on_a_line_caps_a_step_at_the_fixed_costs_worth_or_the_tenants_tokens():
    cost = StepCost()
    cost.observe(1, 5.0)                                   # the first steps (kernel builds): ignored
    cost.observe(64, 0.01)
    for tokens in (1, 4, 16, 64, 2, 32, 8):               # 0.08 s a step + 0.008 s a token, exactly
        cost.observe(tokens, 0.08 + 0.008 * tokens)
    assert cost.points() == [] and cost.cap(1, 2.0, 256) is None   # 7 steps, one of each size: not yet trusted
    for tokens in (1, 4, 16, 64, 2, 32, 8):
        cost.observe(tokens, 0.08 + 0.008 * tokens)
    assert cost.cost(100) == pytest.approx(0.88)
    assert cost.cost(0) == pytest.approx(0.088)           # the fixed cost: the smallest step's, 11 tokens' worth
    # 1 token: 0.088 + 0.088 (12 tokens); 12 tokens: 0.176 + max(0.088, 0.088) (23); for a third, 3 tokens:
    # 0.104 + 2 x 0.088 (25), each under its bound by tokens (13, 24, 27)
    assert cost.cap(1, 2.0, 256) == 12 and cost.cap(12, 2.0, 256) == 23 and cost.cap(3, 3.0, 256) == 25
    assert cost.cap(200, 2.0, 256) == 256                  # the budget binds first
    # a light tenant's 200 prompt tokens owe the others the fixed cost's worth (11 tokens), not 200:
    # 1.68 + 0.088 s (211 tokens); with an allowance of a half, 0.044 s (205); a decode row likewise
    assert cost.cap(200, 2.0, 256, 1.0) == 211 and cost.cap(200, 2.0, 256, 0.5) == 205
    assert cost.cap(1, 2.0, 256, 1.0) == 12 and cost.cap(1, 2.0, 256, 0.5) == 6
    same = StepCost()
    for _ in range(20):
        same.observe(16, 0.2)                              # one step size: no curve to read
    assert same.points() == [] and same.cap(1, 2.0, 256) is None
    flat = StepCost()
    for tokens in (1, 8, 64, 256) * 3:
        flat.observe(tokens, 0.05)                         # a token costs nothing measurable (a GPU at this size)
    assert flat.cap(1, 2.0, 2048) == 2048                  # a step of any width fits: nothing limited


def test_step_cost_reads_a_small_step_off_small_steps_not_off_a_line_through_large_ones():
    # decode rows at 2 ms beside a 17 ms fixed cost, prompt tokens at 1.2 ms in 256-token steps
    # (the shape measured on an AVX-512 EPYC): a line through all of these puts a 1-row step at ~31 ms
    steps = {1: 0.019, 2: 0.021, 4: 0.025, 8: 0.033, 16: 0.049, 256: 0.049 + 0.0012 * 240}
    cost = StepCost()
    for _ in range(3):
        for tokens, seconds in steps.items():
            cost.observe(tokens, seconds)
    assert [x for x, _ in cost.points()] == pytest.approx([1, 2, 4, 8, 16, 256])
    assert cost.cost(1) == pytest.approx(0.019) and cost.cost(12) == pytest.approx(0.041)
    assert cost.cost(0) == pytest.approx(0.019)           # the fixed cost: the smallest step's
    # B wants 1 token: the step may cost 0.019 + 0.019 = 0.038 s: 10 tokens (0.037 s), not 17
    assert cost.cap(1, 2.0, 256) == 10
    # B wants 16: 0.049 + 0.032 = 0.081 s would hold 16 + 26 prompt tokens, but token for token it is 16 + 16
    assert cost.cap(16, 2.0, 256) == 32
    # the curve's middle cheaper than a line (prompt chunks at 1.2 ms a token): a 40-token demand may
    # cost 2 x 0.0778 - 0.019 = 0.137 s, 89 tokens on the curve; by tokens, 80
    assert cost.cost(40) == pytest.approx(0.0778) and cost.cap(40, 2.0, 256) == 80
    noisy = StepCost()
    for tokens, seconds in [(1, 0.020), (2, 0.019), (4, 0.025)] * 4:   # a 2-token step measured faster
        noisy.observe(tokens, seconds)
    assert [y for _, y in noisy.points()] == pytest.approx([0.020, 0.020, 0.025])   # made non-decreasing
    old = StepCost(half_life=2.0)
    for _ in range(4):
        old.observe(1, 0.030)
        old.observe(16, 0.060)
    for _ in range(20):
        old.observe(16, 0.040)                             # the large steps got faster: their bucket follows
    assert old.cost(16) == pytest.approx(0.040, rel=1e-3) and old.cost(1) == pytest.approx(0.030)


def test_share_limits_give_the_lightest_tenant_all_and_bound_the_step():
    equal: dict[str, float] = {}
    # A's flood wants 16 decode rows, B one: B's 1 token plus the larger of 1 and the 10 fixed: a step
    # of 11 tokens costs (11 + 10) / (1 + 10) < 2x B's alone
    assert share_limits({"A": 16, "B": 1}, equal, _linear(10.0), 2048) == {"B": 1, "A": 10}
    # B wants more than the fixed cost: the others get as many tokens as B (under 2x the cost of B alone)
    assert share_limits({"A": 100, "B": 12}, equal, _linear(10.0), 2048) == {"B": 12, "A": 12}
    # three tenants: 3 + 2 x max(3, 4) = 11 tokens, water-filled from the smallest demand up
    assert share_limits({"A": 100, "B": 3, "C": 5}, equal, _linear(4.0), 2048) == {"B": 3, "C": 5, "A": 3}
    # (C wants 5, its part is 4: it finishes, since A keeps 3 >= half its part)
    assert share_limits({"A": 100, "B": 3, "C": 50}, equal, _linear(4.0), 2048) == {"B": 3, "C": 4, "A": 4}
    # the budget binds: B's prompt of 160, over its half (128), is computed whole while A keeps 96 >= 64,
    # not in two steps; a prompt of 200 would leave A 56 < 64: 128 each
    assert share_limits({"A": 500, "B": 160}, equal, _linear(10.0), 256) == {"B": 160, "A": 96}
    assert share_limits({"A": 500, "B": 200}, equal, _linear(10.0), 256) == {"B": 128, "A": 128}
    # with more of B's prompts waiting behind that one, B shares by weight alone
    assert share_limits({"A": 500, "B": 160}, equal, _linear(10.0), 256, backlogged={"A", "B"}) == {"B": 128, "A": 128}
    assert share_limits({"A": 300, "B": 300}, equal, _linear(10.0), 256) == {"A": 128, "B": 128}
    assert share_limits({"A": 500}, equal, _linear(10.0), 2048) is None                  # alone: the whole step
    assert share_limits({"A": 8, "B": 1, "C": 0}, equal, _linear(10.0), 2048) is None    # 1 + 10 >= 9: nothing to limit
    assert share_limits({"A": 8, "B": 1}, equal, _linear(float("inf")), 2048) is None    # a GPU: width costs nothing
    # weights: B (1) beside A (2) is owed a third: 1 + (3 - 1) x max(1, 10) = 21 tokens
    weighted = {"A": 2.0, "B": 1.0}
    assert share_limits({"A": 40, "B": 1}, weighted, _linear(10.0), 2048) == {"B": 1, "A": 20}
    assert share_limits({"A": 16, "B": 1}, weighted, _linear(10.0), 2048) is None        # 17 <= 21
    # both backlogged, the budget binding: 2:1 by weight
    assert share_limits({"A": 300, "B": 300}, weighted, _linear(10.0), 256) == {"A": 170, "B": 86}
    # every tenant gets a token, whatever the rounding: none sits out a whole run of shared steps
    assert share_limits({"L": 1, "A": 1}, {"L": 10.0, "A": 1.0}, _linear(0.0), 2048) == {"L": 1, "A": 1}
    assert share_limits({"A": 9, "B": 9, "C": 9}, equal, _linear(0.0), 2) == {"A": 1, "B": 1, "C": 1}
    # a light tenant owes the others the fixed cost's worth, a prompt as a decode row: its whole 200
    # and 10 of A's (token for token, 128 each); two light tenants: the step as the tightest allows
    assert share_limits({"A": 500, "B": 200}, equal, _linear(10.0), 256, light={"B"}) == {"B": 200, "A": 10}
    assert share_limits({"A": 500, "B": 30}, equal, _linear(10.0), 256, light={"B"}) == {"B": 30, "A": 10}
    assert share_limits({"A": 500, "B": 30}, equal, _linear(10.0), 256) == {"B": 30, "A": 30}   # not light
    # where the budget binds, all but a token for each later tenant (not half the budget)
    assert share_limits({"A": 500, "B": 256}, equal, _linear(10.0), 256, light={"B"}) == {"B": 255, "A": 1}
    assert share_limits({"A": 500, "B": 200}, weighted, _linear(10.0), 256, light={"B"}) == {"B": 200, "A": 20}
    assert share_limits({"A": 500, "B": 40, "C": 1}, equal, _linear(10.0), 256, light={"B", "C"}) \
        == {"C": 1, "B": 10, "A": 10}


class _FixedCost(StepCost):
    """A step cost model of a line whose fixed cost is `fixed` tokens' worth, whatever the steps took
    (exact tests)."""

    def __init__(self, fixed: float):
        super().__init__()
        self.fixed = fixed

    def points(self) -> list[tuple[float, float]]:
        return [(0.0, self.fixed), (1.0, self.fixed + 1.0)]

    def cap(self, tokens: int, ratio: float, budget: int, light: float | None = None) -> int:
        return min(budget, math.floor(_linear(self.fixed)(tokens, ratio, light)))


@pytest.mark.parametrize("share", [True, False])
def test_a_shared_step_runs_the_light_tenant_and_part_of_the_flood(share):
    s = _scheduler(max_num_seqs=32, max_num_batched_tokens=256, num_blocks=256, fair_step_share=share)
    s.step_cost = _FixedCost(10.0)
    flood = [new_sequence(_request(f"a{i}", "A"), 0, list(range(4))) for i in range(16)]
    for seq in flood:
        s.add(seq)
    finish_step(s, s.schedule())                            # A alone: all 16 prompts in one step
    light = new_sequence(_request("b0", "B"), 0, list(range(4)))
    s.add(light)
    out = s.schedule()                                      # B's prompt (4) beside A's 16 decode rows
    ids = [i.seq.request.request_id for i in out.scheduled]
    if not share:
        assert len(ids) == 17 and s.num_shared_steps == 0
        return
    # B is light (1 of 32 seats): its 4 + the default allowance (0.7) of the 10 fixed cost's worth for A
    assert out.num_batched_tokens == 4 + 7 and "b0" in ids
    assert ids.count("b0") == 1 and len(ids) == 1 + 7       # A: its 7 earliest rows
    assert [i for i in ids if i != "b0"] == [f"a{i}" for i in range(7)]
    finish_step(s, out)
    out = s.schedule()                                      # B decodes: 1 row + 7 of A's (the earliest)
    assert out.num_batched_tokens == 8 and "b0" in [i.seq.request.request_id for i in out.scheduled]
    assert all(seq.status.name == "RUNNING" for seq in flood)   # the rest sat the step out, blocks kept
    assert all(seq.blocks for seq in flood)
    assert s.num_shared_steps == 2


def test_a_waiting_prompt_in_the_prefix_cache_counts_only_the_tokens_it_computes():
    s = _scheduler(max_num_seqs=32, max_num_batched_tokens=128, num_blocks=256, fair_light_allowance=1.0)
    s.step_cost = _FixedCost(10.0)
    prompt = list(range(100, 140))                          # 40 tokens: 10 blocks of 4
    first = new_sequence(_request("b0", "B"), 0, list(prompt))
    s.add(first)
    finish_step(s, s.schedule())
    s.kv.cache_computed_blocks(first)
    s.finish(first, "stop")                                 # B's prompt stays in the prefix cache
    for i in range(8):
        s.add(new_sequence(_request(f"a{i}", "A"), 0, list(range(4))))
    finish_step(s, s.schedule())                            # A: 8 running rows
    s.add(new_sequence(_request("a-long", "A"), 0, list(range(500, 548))))   # and a 48-token prompt waiting
    again = new_sequence(_request("b1", "B"), 0, list(prompt))
    s.add(again)
    queries = s.kv.pool.queries
    assert s.kv.cached_prefix_tokens(again) == 36 and s.kv.pool.queries == queries   # an estimate: not a cache query
    out = s.schedule()
    # B (light) computes 4 tokens (36 cached): 4 + the fixed cost's 10 = 14. Counted whole (40), B's
    # demand let A's tokens in beside B's 4 as if B computed 40.
    assert [(i.seq.request.request_id, i.num_new_tokens) for i in out.scheduled if i.seq is again] == [("b1", 4)]
    assert again.num_computed_tokens == 36 and out.num_batched_tokens == 14 and s.num_shared_steps == 1


@pytest.mark.parametrize("b", ["light", "light-half", "served-more", "more-waiting"])
def test_a_light_prompt_runs_whole_beside_the_fixed_costs_worth_else_over_its_half_or_by_weight(b):
    s = _scheduler(max_num_seqs=32, max_num_batched_tokens=256, num_blocks=512,
                   fair_light_allowance=0.5 if b == "light-half" else 1.0)
    s.step_cost = _FixedCost(10.0)
    for i in range(16):
        s.add(new_sequence(_request(f"a{i}", "A"), 0, list(range(4))))
    finish_step(s, s.schedule())                            # A: 16 running rows
    s.add(new_sequence(_request("a-long", "A"), 0, list(range(1000, 1240))))   # and a 240-token prompt
    b0 = new_sequence(_request("b0", "B"), 0, list(range(2000, 2160)))          # B: a 160-token prompt
    s.add(b0)
    if b == "served-more":    # B's counter more than a step's budget above A's: not light
        s.vtc.charge("B", 1.0, s.vtc.counter("A") - s.vtc.counter("B") + 257, 0)
    if b == "more-waiting":   # another prompt of B's waits behind it: backlogged
        s.add(new_sequence(_request("b1", "B"), 0, list(range(3000, 3100))))
    out = s.schedule()
    mine = sum(i.num_new_tokens for i in out.scheduled if i.seq.request.tenant == "B")
    theirs = out.num_batched_tokens - mine
    # light (one sequence of 32 seats, served no more than A): its whole 160 and A the fixed cost's
    # worth (10 of its rows; 5 with an allowance of a half); else B's part of the 256 is 128: it still
    # takes its whole 160 where A keeps 96 >= 64; with another prompt of its own waiting, B is
    # backlogged and shares by weight
    assert (mine, theirs) == {"light": (160, 10), "light-half": (160, 5), "served-more": (160, 96),
                              "more-waiting": (128, 128)}[b]


def test_light_tenants_are_few_sequences_served_no_more_than_the_others():
    s = _scheduler(max_num_seqs=16, max_num_batched_tokens=256, num_blocks=512)
    for i in range(12):
        s.add(new_sequence(_request(f"a{i}", "A"), 0, list(range(4))))
    for i in range(4):
        s.add(new_sequence(_request(f"b{i}", "B"), 0, list(range(4))))
    demand, weights = {"A": 12, "B": 4}, {"A": 1.0, "B": 1.0}
    assert s._light(demand, weights, 256, set()) == {"B"}          # 4 of B's part 8: at most half
    s.add(new_sequence(_request("b4", "B"), 0, list(range(4))))
    assert s._light(demand, weights, 256, set()) == set()          # 5: more than half
    assert s._light(demand, {"A": 1.0, "B": 3.0}, 256, set()) == {"B"}   # weight 3: its part is 12
    assert s._light(demand, {"A": 1.0, "B": 3.0}, 256, {"B"}) == set()   # a second prompt waiting
    s.vtc.charge("B", 1.0, s.vtc.counter("A") - s.vtc.counter("B") + 80, 0)
    assert s._light(demand, {"A": 1.0, "B": 3.0}, 256, set()) == {"B"}   # 80 above A: within 256 / 3
    s.vtc.charge("B", 1.0, 10, 0)
    assert s._light(demand, {"A": 1.0, "B": 3.0}, 256, set()) == set()   # 90 above: past it


def test_shared_steps_are_shared_among_the_most_urgent_priority():
    s = _scheduler(max_num_seqs=32, max_num_batched_tokens=256, num_blocks=256)
    s.step_cost = _FixedCost(10.0)
    for i in range(16):
        s.add(new_sequence(_request(f"a{i}", "A", priority=0), 0, list(range(4))))
    s.add(new_sequence(_request("y0", "Y", priority=5), 0, list(range(4))))   # less urgent
    finish_step(s, s.schedule())
    out = s.schedule()
    ids = [i.seq.request.request_id for i in out.scheduled]
    # Y's less urgent work does not narrow A's steps (A alone at priority 0: nothing limited)
    assert [f"a{i}" for i in range(16)] == [r for r in ids if r.startswith("a")] and s.num_shared_steps == 0


# -- the engine -----------------------------------------------------------------------------------

PARAMS = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


def _engine(tiny_model, scheduling, **cfg):
    engine = LLMEngine(model=tiny_model, scheduling=scheduling, **cfg)
    admitted: dict[str, int] = {}
    finished: dict[str, int] = {}

    def hook(batch):
        for item in batch.scheduled:
            admitted.setdefault(item.seq.request.request_id, engine.counters["steps"])
    engine.step_hook = hook
    return engine, admitted, finished


def _step(engine, finished):
    for out in engine.step():
        if out.finished:
            finished[out.request_id] = engine.counters["steps"]


def _prompt(rng, n=8):
    return [rng.randrange(3, 300) for _ in range(n)]


@pytest.mark.parametrize("scheduling", ["fair", "fifo"])
def test_a_late_tenant_is_not_stuck_behind_a_backlog(tiny_model, scheduling):
    engine, admitted, finished = _engine(tiny_model, scheduling, max_num_seqs=4)
    rng = random.Random(0)
    a = [f"a{i}" for i in range(40)]
    b = [f"b{i}" for i in range(5)]
    for rid in a:
        engine.add_request(rid, _prompt(rng), PARAMS, tenant="A")
    for _ in range(3):
        _step(engine, finished)
    for rid in b:
        engine.add_request(rid, _prompt(rng), PARAMS, tenant="B")
    while engine.has_unfinished_requests():
        _step(engine, finished)
    last_a = max(admitted[r] for r in a)
    if scheduling == "fair":
        assert max(admitted[r] for r in b) < last_a
        # B and A share the 4 slots about evenly: 5 requests of 6 steps each, ~2 slots -> ~20 steps
        assert max(finished[r] for r in b) <= 3 + 24
        assert max(finished[r] for r in b) < max(finished[r] for r in a) / 2
    else:
        assert min(admitted[r] for r in b) >= last_a


def test_weights_share_tokens_in_proportion(tiny_model):
    engine, _, _ = _engine(tiny_model, "fair", max_num_seqs=4)
    rng = random.Random(1)
    prompt = _prompt(rng)
    for i in range(30):
        engine.add_request(f"a{i}", prompt, PARAMS, tenant="A", weight=2.0)
        engine.add_request(f"b{i}", prompt, PARAMS, tenant="B", weight=1.0)
    for _ in range(60):
        engine.step()
    served = engine.tenant_tokens()
    assert served["A"] / served["B"] == pytest.approx(2.0, rel=0.15)
    assert engine.has_unfinished_requests()   # both still backlogged when measured


def test_fifo_admits_by_priority_then_arrival_as_before(tiny_model):
    engine, admitted, _ = _engine(tiny_model, "fifo", max_num_seqs=3)
    rng = random.Random(2)
    workload = []
    for i in range(18):
        rid, tenant, priority = f"r{i}", rng.choice("ABC"), rng.choice([0, 0, 5, -1])
        prompt = _prompt(rng, rng.randint(3, 20))
        workload.append((rid, prompt, priority))
        engine.add_request(rid, prompt, PARAMS, priority=priority, tenant=tenant, weight=rng.choice([1.0, 3.0]))
    outputs = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = out.outputs[0].token_ids
    expected = [rid for rid, _, _ in sorted(workload, key=lambda w: (w[2], int(w[0][1:])))]
    assert sorted(admitted, key=lambda rid: (admitted[rid], expected.index(rid))) == expected
    # admission steps never go backwards along (priority, arrival)
    steps = [admitted[rid] for rid in expected]
    assert steps == sorted(steps)
    assert [outputs[rid] for rid, _, _ in workload] == hf_greedy(tiny_model, [p for _, p, _ in workload], 6)


def test_priority_beats_any_counter(tiny_model):
    engine, admitted, finished = _engine(tiny_model, "fair", max_num_seqs=1)
    rng = random.Random(3)
    for i in range(5):
        engine.add_request(f"a{i}", _prompt(rng), PARAMS, priority=5, tenant="A")
    engine.scheduler.vtc.counters["B"] = 1e9        # B has been served far more than A
    engine.add_request("b0", _prompt(rng), PARAMS, priority=0, tenant="B")
    while engine.has_unfinished_requests():
        _step(engine, finished)
    order = sorted(admitted, key=admitted.get)
    assert order == ["b0", "a0", "a1", "a2", "a3", "a4"]


def test_shared_steps_bound_the_flood_beside_a_light_tenant_and_keep_greedy_outputs(tiny_model):
    engine, _, finished = _engine(tiny_model, "fair", max_num_seqs=16, max_num_batched_tokens=64)
    engine.scheduler.step_cost = _FixedCost(2.0)
    widths: list[tuple[int, int]] = []     # (tokens of the step, B's tokens in it) for steps B is in
    hook = engine.step_hook

    def watch(batch):
        hook(batch)
        mine = sum(i.num_new_tokens for i in batch.scheduled if i.seq.request.tenant == "B")
        if mine:
            widths.append((batch.num_batched_tokens, mine))
    engine.step_hook = watch
    rng = random.Random(4)
    greedy = SamplingParams(temperature=0, max_tokens=6)   # stops at EOS, as transformers does
    prompts = {f"a{i}": _prompt(rng, 12) for i in range(12)}
    for rid, prompt in prompts.items():
        engine.add_request(rid, prompt, greedy, tenant="A")
    for _ in range(3):
        _step(engine, finished)
    prompts["b0"] = _prompt(rng, 5)
    engine.add_request("b0", prompts["b0"], greedy, tenant="B")
    outputs = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = out.outputs[0].token_ids
    # every step B was in held at most 2 x B's tokens + 2 (the fixed cost's worth): A sat out the rest
    assert widths and all(total <= 2 * mine + 2 for total, mine in widths)
    assert engine.stats().shared_steps > 0
    ids = list(prompts)
    assert [outputs[r] for r in ids] == hf_greedy(tiny_model, [prompts[r] for r in ids], 6)


def test_the_engine_measures_its_step_cost(tiny_model):
    engine, _, finished = _engine(tiny_model, "fair", max_num_seqs=2)   # steps of 1-2 rows and of prompts
    rng = random.Random(5)
    for i in range(8):
        engine.add_request(f"a{i}", _prompt(rng, rng.randint(3, 30)), PARAMS, tenant="A")
    while engine.has_unfinished_requests():
        _step(engine, finished)
    cost = engine.scheduler.step_cost
    assert cost.steps == engine.counters["steps"] - StepCost.SKIP_STEPS >= StepCost.MIN_STEPS
    points = cost.points()                    # steps of 1-2 rows and of prompts: several sizes, each timed
    assert len(points) >= 2 and all(0.0 < seconds < 10.0 for _, seconds in points)
    assert engine.stats().shared_steps == 0            # one tenant: never limited

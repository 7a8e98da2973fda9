"""Scheduler decisions on a tiny pool: budgets, chunking, admission order, preemption."""
from worker.engine.config import EngineConfig
from worker.engine.kv_cache_manager import KVCacheManager
from worker.engine.request import Request, Sequence
from worker.engine.sampling_params import SamplingParams
from worker.engine.scheduler import Scheduler


def new_sequence(request, index, token_ids):
    seq = Sequence(request=request, index=index, token_ids=token_ids, detok=None)
    request.seqs.append(seq)
    return seq


def make(num_blocks=8, block_size=4, **cfg):
    config = EngineConfig(block_size=block_size, **cfg)
    kv = KVCacheManager(num_blocks, block_size)
    return Scheduler(config, kv, new_sequence)


def add(s, rid, n_tokens, priority=0, n=1):
    req = Request(rid, None, list(range(100, 100 + n_tokens)), SamplingParams(max_tokens=8, n=n), priority)
    s.add(new_sequence(req, 0, list(req.prompt_token_ids)))
    return req


def finish_step(s, out, next_token=1):
    """What the engine does after a forward pass: count computed tokens, append sampled ones."""
    for item in out.scheduled:
        item.seq.num_computed_tokens += item.num_new_tokens
    for seq, _ in out.samples:
        seq.append(next_token)


def test_long_prompt_is_chunked_under_the_token_budget():
    s = make(max_num_batched_tokens=5)
    add(s, "a", 12)
    sizes = []
    for _ in range(3):
        out = s.schedule()
        sizes.append([i.num_new_tokens for i in out.scheduled])
        assert (len(out.samples) == 1) == (sum(sum(x) for x in sizes) == 12)
        finish_step(s, out)
    assert sizes == [[5], [5], [2]]


def test_admission_by_priority_then_arrival_and_max_num_seqs():
    s = make(max_num_seqs=2)
    add(s, "late-low", 2, priority=5)
    add(s, "urgent", 2, priority=-1)
    add(s, "normal-1", 2)
    add(s, "normal-2", 2)
    out = s.schedule()
    assert [i.seq.request.request_id for i in out.scheduled] == ["urgent", "normal-1"]


def test_running_requests_join_with_new_ones_in_one_step():
    s = make(max_num_batched_tokens=16)
    add(s, "a", 4)
    finish_step(s, s.schedule())
    add(s, "b", 6)
    out = s.schedule()
    assert [(i.seq.request.request_id, i.num_new_tokens) for i in out.scheduled] == [("a", 1), ("b", 6)]


def test_prompts_take_at_most_the_cap_beside_decoding_sequences():
    s = make(num_blocks=32, max_num_batched_tokens=64, max_prompt_tokens_per_step=6)
    add(s, "a", 4)
    out = s.schedule()
    assert [(i.seq.request.request_id, i.num_new_tokens) for i in out.scheduled] == [("a", 4)]
    finish_step(s, out)
    for rid in ("b", "c", "d"):
        add(s, rid, 4)
    steps = []
    for _ in range(3):
        out = s.schedule()
        steps.append([(i.seq.request.request_id, i.num_new_tokens) for i in out.scheduled])
        finish_step(s, out)
    # "a" decodes every step; the prompts come 6 tokens a step ("c" chunked over two steps), in arrival order
    assert steps == [[("a", 1), ("b", 4), ("c", 2)], [("a", 1), ("b", 1), ("c", 2), ("d", 4)],
                     [("a", 1), ("b", 1), ("c", 1), ("d", 1)]]


def test_prompts_fill_a_step_up_to_one_call_where_that_leaves_at_least_half_the_cap():
    s = make(num_blocks=64, max_num_batched_tokens=64, max_prompt_tokens_per_step=8)
    s.one_call_tokens = 10
    for rid in ("a", "b"):
        add(s, rid, 4)
    finish_step(s, s.schedule())           # "a" and "b" decode from here on
    add(s, "c", 30)
    out = s.schedule()                     # 10 - 2 decode rows: 8 prompt tokens (the cap), one call
    assert [i.num_new_tokens for i in out.scheduled] == [1, 1, 8]
    finish_step(s, out)
    s.one_call_tokens = 8                  # 8 - 2 = 6 >= half the cap: 6, the step still one call
    out = s.schedule()
    assert [i.num_new_tokens for i in out.scheduled] == [1, 1, 6] and out.num_batched_tokens == 8
    finish_step(s, out)
    s.one_call_tokens = 5                  # 5 - 2 = 3 < half the cap: the cap
    assert [i.num_new_tokens for i in s.schedule().scheduled] == [1, 1, 8]
    tiny = make(num_blocks=64, max_num_batched_tokens=64, max_prompt_tokens_per_step=1)
    tiny.one_call_tokens = 1
    add(tiny, "a", 1)
    finish_step(tiny, tiny.schedule())
    add(tiny, "b", 3)                      # 1 - 1 decode row leaves nothing: the cap still lets a token in
    assert [i.num_new_tokens for i in tiny.schedule().scheduled] == [1, 1]


def test_a_lone_prompt_takes_the_whole_budget_and_a_cold_burst_the_cap():
    s = make(num_blocks=32, max_num_batched_tokens=64, max_prompt_tokens_per_step=6)
    add(s, "a", 12)
    assert [i.num_new_tokens for i in s.schedule().scheduled] == [12]   # nothing else has work: its first token soonest
    s = make(num_blocks=32, max_num_batched_tokens=64, max_prompt_tokens_per_step=6)
    for rid in ("a", "b", "c"):
        add(s, rid, 4)
    out = s.schedule()                     # several prompts, nothing decoding: still 6 a step
    assert [(i.seq.request.request_id, i.num_new_tokens) for i in out.scheduled] == [("a", 4), ("b", 2)]
    # without the cap, a prompt arriving beside decodes takes what the budget allows
    s = make(num_blocks=32, max_num_batched_tokens=64)
    add(s, "a", 4)
    finish_step(s, s.schedule())
    add(s, "b", 12)
    assert [i.num_new_tokens for i in s.schedule().scheduled] == [1, 12]


def test_preemption_takes_the_least_urgent_latest_and_recomputes_it():
    s = make(num_blocks=4, block_size=4, max_num_batched_tokens=64)
    add(s, "first", 7)        # 2 blocks
    add(s, "second", 7)       # 2 blocks: the pool is full
    finish_step(s, s.schedule())  # both now hold 8 tokens in 2 blocks each
    out = s.schedule()            # each needs a token slot at position 7: fits
    finish_step(s, out)
    out = s.schedule()            # position 8 needs a third block each: "second" is preempted
    assert [p.request.request_id for p in out.preempted] == ["second"]
    assert [i.seq.request.request_id for i in out.scheduled] == ["first"]
    second = s.waiting.peek()
    assert second.num_computed_tokens == 0 and second.blocks == []
    assert second.num_tokens == 9    # its generated tokens are kept and will be recomputed
    assert s.num_preemptions == 1


def test_n_samples_fork_after_the_prompt_and_share_its_logits_row():
    s = make(num_blocks=8, block_size=4)
    req = add(s, "n3", 6, n=3)
    out = s.schedule()
    assert len(out.scheduled) == 1
    assert [(seq.index, row) for seq, row in out.samples] == [(0, 0), (1, 0), (2, 0)]
    assert len(req.seqs) == 3
    assert [b.block_id for b in req.seqs[2].blocks] == [0, 1]
    assert req.seqs[0].blocks[1].ref_cnt == 3

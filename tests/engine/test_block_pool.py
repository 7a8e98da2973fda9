"""Block pool and KV-cache manager bookkeeping, with exact block ids on tiny pools."""
import pytest

from worker.engine.block_pool import BlockPool, hash_block
from worker.engine.kv_cache_manager import KVCacheManager
from worker.engine.request import Request, Sequence
from worker.engine.sampling_params import SamplingParams


def ids(blocks):
    return [b.block_id for b in blocks]


def make_seq(tokens, index=0, request=None):
    request = request or Request("r", None, list(tokens), SamplingParams(max_tokens=4))
    seq = Sequence(request=request, index=index, token_ids=list(tokens), detok=None)
    request.seqs.append(seq)
    return seq


def test_allocate_and_free_follow_lru_order():
    pool = BlockPool(4)
    a = pool.allocate(2)
    b = pool.allocate(1)
    assert ids(a) == [0, 1] and ids(b) == [2]
    assert pool.num_free == 1 and pool.num_used == 3
    pool.free(reversed(a))                      # freed last-first: 1 then 0
    assert ids(pool.allocate(3)) == [3, 1, 0]   # never-used block 3 first, then in freeing order
    assert not pool.can_allocate(1)
    with pytest.raises(RuntimeError):
        pool.allocate(1)


def test_shared_block_returns_to_pool_only_after_last_reference():
    pool = BlockPool(2)
    (blk,) = pool.allocate(1)
    pool.share([blk])
    assert blk.ref_cnt == 2
    pool.free([blk])
    assert pool.num_free == 1
    pool.free([blk])
    assert pool.num_free == 2


def test_prefix_cache_hit_reuses_a_freed_block_and_eviction_is_lru():
    pool = BlockPool(3)
    b0, b1 = pool.allocate(2)
    h0 = hash_block(None, [1, 2])
    h1 = hash_block(h0, [3, 4])
    pool.cache(b0, h0, [1, 2])
    pool.cache(b1, h1, [3, 4])
    pool.free([b1, b0])                          # free queue: 2, 1, 0
    assert pool.lookup(h0, [1, 2]) is b0         # still cached while free
    assert pool.lookup(h0, [9, 9]) is None       # hash hit, tokens differ: verified miss
    assert (pool.hits, pool.queries) == (1, 2)
    (fresh,) = pool.allocate(1)                  # block 2 was never cached
    assert fresh.block_id == 2
    (evicted,) = pool.allocate(1)                # LRU: block 1 goes first, losing its cache entry
    assert evicted.block_id == 1
    assert pool.lookup(h1, [3, 4]) is None
    assert pool.lookup(h0, [1, 2]) is b0


def test_chained_hash_depends_on_the_prefix():
    assert hash_block(None, [1, 2]) != hash_block(hash_block(None, [0, 0]), [1, 2])
    assert hash_block(None, [1, 2]) == hash_block(None, [1, 2])


def test_manager_admits_with_cached_prefix_and_frees_everything():
    kv = KVCacheManager(num_blocks=6, block_size=4)
    first = make_seq(range(10))                    # 3 blocks: 2 full + 1 partial
    assert kv.admit(first, kv.find_cached_prefix(first), 10)
    assert ids(first.blocks) == [0, 1, 2]
    first.num_computed_tokens = 10
    kv.cache_computed_blocks(first)
    kv.free(first)
    second = make_seq(list(range(8)) + [99, 98, 97])   # shares the two full blocks
    hits = kv.find_cached_prefix(second)
    assert ids(hits) == [0, 1]
    assert kv.admit(second, hits, 3)
    assert second.num_computed_tokens == 8
    assert ids(second.blocks) == [0, 1, 3]         # never-used blocks leave the free queue first
    kv.free(second)
    assert kv.pool.num_free == 6


def test_full_prompt_hit_still_leaves_a_token_to_compute():
    kv = KVCacheManager(num_blocks=4, block_size=4)
    seq = make_seq(range(8))
    kv.admit(seq, [], 8)
    seq.num_computed_tokens = 8
    kv.cache_computed_blocks(seq)
    kv.free(seq)
    again = make_seq(range(8))
    assert ids(kv.find_cached_prefix(again)) == [0]   # block 1 is recomputed for its logits


def test_fork_shares_blocks_and_copies_on_write():
    kv = KVCacheManager(num_blocks=6, block_size=4)
    leader = make_seq(range(6))
    kv.admit(leader, [], 6)
    leader.num_computed_tokens = 6
    child = make_seq(range(6), index=1, request=leader.request)
    kv.fork(leader, child)
    child.num_computed_tokens = 6
    assert ids(child.blocks) == [0, 1] and leader.blocks[1].ref_cnt == 2
    leader.token_ids.append(7)
    child.token_ids.append(8)
    assert kv.allocate_slots(leader, 1)        # writes into shared block 1: copy first
    assert ids(leader.blocks) == [0, 2]
    assert kv.take_copies() == [(1, 2)]
    assert kv.allocate_slots(child, 1)         # block 1 is now the child's alone: no copy
    assert ids(child.blocks) == [0, 1]
    assert kv.take_copies() == []
    kv.free(leader)
    kv.free(child)
    assert kv.pool.num_free == 6


def test_allocate_slots_refuses_without_side_effects():
    kv = KVCacheManager(num_blocks=2, block_size=4)
    seq = make_seq(range(4))
    kv.admit(seq, [], 4)
    seq.num_computed_tokens = 4
    assert kv.allocate_slots(seq, 4)
    assert not kv.allocate_slots(seq, 5)
    assert ids(seq.blocks) == [0, 1] and kv.pool.num_free == 0

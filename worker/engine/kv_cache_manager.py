"""Maps sequences to KV blocks: prefix-cache lookups, slot allocation with copy-on-write, freeing."""
from __future__ import annotations

from worker.engine.block_pool import Block, BlockPool, hash_block
from worker.engine.request import Sequence


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True):
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.pool = BlockPool(num_blocks, enable_caching)
        # (src, dst) block copies the model runner must do before the next forward pass
        self.pending_copies: list[tuple[int, int]] = []

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _update_hashes(self, seq: Sequence) -> None:
        """Extend the sequence's chained hashes over its full blocks of known tokens."""
        bs = self.block_size
        hashes = seq.block_hashes
        for i in range(len(hashes), seq.num_tokens // bs):
            hashes.append(hash_block(hashes[-1] if hashes else None, seq.token_ids[i * bs:(i + 1) * bs]))

    def find_cached_prefix(self, seq: Sequence) -> list[Block]:
        """The longest run of cached full blocks that starts the sequence, leaving at least one
        token to compute (its logits are needed to sample)."""
        if not self.enable_caching:
            return []
        hits = []
        for i, h in enumerate(self._prefix_hashes(seq)):
            block = self.pool.lookup(h, seq.token_ids[i * self.block_size:(i + 1) * self.block_size])
            if block is None:
                break
            hits.append(block)
        return hits

    def cached_prefix_tokens(self, seq: Sequence) -> int:
        """About how many of `seq`'s first tokens `find_cached_prefix` would find (by hash alone,
        not counted in the cache's hit rate): the scheduler's estimate of a waiting prompt's work."""
        if not self.enable_caching:
            return 0
        n = 0
        for h in self._prefix_hashes(seq):
            if not self.pool.holds(h):
                break
            n += 1
        return n * self.block_size

    def _prefix_hashes(self, seq: Sequence) -> list[bytes]:
        """The hashes of `seq`'s full blocks a cached prefix may cover: all but one token's worth,
        so at least one token is computed (its logits are needed to sample)."""
        self._update_hashes(seq)
        return seq.block_hashes[:(seq.num_tokens - 1) // self.block_size]

    def admit(self, seq: Sequence, cached: list[Block], num_new_tokens: int) -> bool:
        """Give a waiting sequence its cached prefix and room for num_new_tokens after it."""
        need = self.blocks_needed(len(cached) * self.block_size + num_new_tokens) - len(cached)
        free_cached = sum(1 for b in cached if b.ref_cnt == 0)  # hits that sit in the free queue
        if not self.pool.can_allocate(need + free_cached):
            return False
        self.pool.share(cached)
        seq.blocks = list(cached) + self.pool.allocate(need)
        seq.num_computed_tokens = len(cached) * self.block_size
        seq.num_registered_blocks = len(cached)
        return True

    def allocate_slots(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Make room for the next num_new_tokens of a sequence that holds blocks. A shared block
        about to be written is copied first (copy-on-write). False when the pool is too small;
        nothing changes then."""
        bs = self.block_size
        first = seq.num_computed_tokens // bs
        need = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.blocks)
        cow = first < len(seq.blocks) and seq.blocks[first].ref_cnt > 1
        if not self.pool.can_allocate(max(need, 0) + cow):
            return False
        if cow:
            old = seq.blocks[first]
            new = self.pool.allocate(1)[0]
            self.pool.free([old])
            seq.blocks[first] = new
            self.pending_copies.append((old.block_id, new.block_id))
        if need > 0:
            seq.blocks.extend(self.pool.allocate(need))
        return True

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """The child shares every block of the parent; writes will copy (see allocate_slots)."""
        self.pool.share(parent.blocks)
        child.blocks = list(parent.blocks)
        child.block_hashes = list(parent.block_hashes)
        child.num_registered_blocks = parent.num_registered_blocks

    def cache_computed_blocks(self, seq: Sequence) -> None:
        """Register the sequence's blocks that are full and computed in the prefix cache."""
        if not self.enable_caching:
            return
        self._update_hashes(seq)
        bs = self.block_size
        full = min(seq.num_computed_tokens // bs, len(seq.block_hashes))
        for i in range(seq.num_registered_blocks, full):
            self.pool.cache(seq.blocks[i], seq.block_hashes[i], seq.token_ids[i * bs:(i + 1) * bs])
        seq.num_registered_blocks = max(seq.num_registered_blocks, full)

    def free(self, seq: Sequence) -> None:
        self.pool.free(reversed(seq.blocks))
        seq.blocks = []
        seq.num_registered_blocks = 0

    def take_copies(self) -> list[tuple[int, int]]:
        copies, self.pending_copies = self.pending_copies, []
        return copies

"""The KV-cache block pool: plain bookkeeping, no torch.

Blocks carry reference counts. Free blocks wait in an LRU queue (oldest-freed first out). A full
block may stay registered in the prefix cache while it is free: it is reused on a hit and evicted
only when the free queue hands it out for new data.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from array import array


def hash_block(parent_hash: bytes | None, token_ids) -> bytes:
    """Chained hash of a full block: it names the block's tokens and everything before them."""
    h = hashlib.blake2b(parent_hash or b"root", digest_size=16)
    h.update(array("q", token_ids).tobytes())
    return h.digest()


@dataclass(slots=True, eq=False)
class Block:
    block_id: int
    ref_cnt: int = 0
    block_hash: bytes | None = None       # set while the block is registered in the prefix cache
    token_ids: tuple[int, ...] = ()       # the tokens it holds, to verify a hash hit


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.enable_caching = enable_caching
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[bytes, Block] = {}
        self.hits = 0
        self.queries = 0

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self.blocks) - len(self._free)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[Block]:
        """Take n blocks from the head of the free queue (least recently freed), evicting their
        prefix-cache entries. The caller asks `can_allocate` first."""
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} blocks with {len(self._free)} free")
        out = []
        for _ in range(n):
            block = self.blocks[self._free.popitem(last=False)[0]]
            self._evict(block)
            block.ref_cnt = 1
            out.append(block)
        return out

    def free(self, blocks) -> None:
        """Drop one reference from each block; blocks that reach zero join the tail of the free
        queue in the order given (callers pass a sequence's blocks last-first, so its tail blocks,
        the least likely to be shared, are evicted before its prefix)."""
        for block in blocks:
            block.ref_cnt -= 1
            assert block.ref_cnt >= 0, f"block {block.block_id} freed twice"
            if block.ref_cnt == 0:
                self._free[block.block_id] = None

    def share(self, blocks) -> None:
        """Add a reference to blocks that are already held (a fork) or cached and free (a hit)."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self._free[block.block_id]
            block.ref_cnt += 1

    def holds(self, block_hash: bytes) -> bool:
        """Whether a block is cached under `block_hash` (no token check, not counted as a query:
        for estimates, such as the scheduler's demand of a waiting prompt)."""
        return block_hash in self._cached

    def lookup(self, block_hash: bytes, token_ids) -> Block | None:
        self.queries += 1
        block = self._cached.get(block_hash)
        if block is None or block.token_ids != tuple(token_ids):
            return None
        self.hits += 1
        return block

    def cache(self, block: Block, block_hash: bytes, token_ids) -> None:
        """Register a full block under its chained hash (first writer wins on duplicates)."""
        if not self.enable_caching or block.block_hash is not None or block_hash in self._cached:
            return
        block.block_hash = block_hash
        block.token_ids = tuple(token_ids)
        self._cached[block_hash] = block

    def _evict(self, block: Block) -> None:
        if block.block_hash is not None:
            del self._cached[block.block_hash]
            block.block_hash = None
            block.token_ids = ()

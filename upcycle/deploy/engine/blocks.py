"""The paged KV cache's bookkeeping: fixed-size blocks, reference counts and prefix caching.

The cache (upcycle.deploy.engine.kv_cache) is a pool of blocks of `block_size` tokens; each sequence
holds a block table, so a sequence holds memory for the tokens it has, not for
`max_model_len`, and sequences that share a prefix share its blocks. This is vLLM's automatic
prefix caching: a full block is known by a hash of (its parent block's hash, its tokens), so a
hash names the whole prefix up to the block's end; a block no sequence references any more keeps
its contents and its hash until the pool needs it back, the least recently released first.

Written here because it is the scheduler's half of the engine (the kernels' half is
`StepIndex`); vLLM's block manager is bound to vLLM's scheduler and CUDA allocator.
"""

from __future__ import annotations

import array
import collections
import hashlib


def block_hash(parent: bytes | None, tokens: list[int]) -> bytes:
    """The key of a full block: 128 bits of BLAKE2b over its parent's key and its token ids (a
    cryptographic hash, as vLLM's `sha256` option: one request cannot forge a collision that
    would hand it another's cache)."""
    h = hashlib.blake2b(parent or b"", digest_size=16)
    h.update(array.array("q", tokens).tobytes())
    return h.digest()


def blocks_for(tokens: int, block_size: int) -> int:
    """Blocks that hold `tokens` tokens."""
    return -(-tokens // block_size)


def default_blocks(max_num_seqs: int, max_model_len: int, block_size: int) -> int:
    """A pool with room for `max_num_seqs` sequences of `max_model_len` tokens (what the slot
    cache this pool replaced held): the size when none is asked for."""
    return max_num_seqs * blocks_for(max_model_len, block_size)


class PoolExhausted(Exception):
    """No free or evictable block is left: the scheduler preempts a sequence."""


class BlockPool:
    """`num_blocks` blocks: free, referenced by sequences, or cached (unreferenced, evictable)."""

    def __init__(self, num_blocks: int, block_size: int, *, prefix_caching: bool = True):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.prefix_caching = prefix_caching
        self.refs = [0] * num_blocks
        self._free = collections.deque(range(num_blocks))  # no contents worth keeping
        self._cached: collections.OrderedDict[int, bytes] = collections.OrderedDict()  # LRU
        self._by_hash: dict[bytes, int] = {}
        self._hash_of: dict[int, bytes] = {}

    @property
    def available(self) -> int:
        """Blocks an allocation can take (free ones, then cached ones)."""
        return len(self._free) + len(self._cached)

    @property
    def used(self) -> int:
        """Blocks some sequence references."""
        return self.num_blocks - self.available

    def allocate(self) -> int:
        """A block with reference count 1; evicts the least recently released cached block when
        no free one is left. Raises PoolExhausted when every block is referenced."""
        if self._free:
            block = self._free.popleft()
        elif self._cached:
            block, key = self._cached.popitem(last=False)
            del self._by_hash[key], self._hash_of[block]
        else:
            raise PoolExhausted
        self.refs[block] = 1
        return block

    def match(self, hashes: list[bytes]) -> list[int]:
        """The blocks holding the longest cached prefix of `hashes`, each now referenced once
        more (the caller owns them as if allocated)."""
        if not self.prefix_caching:
            return []
        blocks = []
        for key in hashes:
            block = self._by_hash.get(key)
            if block is None:
                break
            if self.refs[block] == 0:
                del self._cached[block]
            self.refs[block] += 1
            blocks.append(block)
        return blocks

    def cached(self, key: bytes) -> bool:
        return self.prefix_caching and key in self._by_hash

    def commit(self, block: int, key: bytes) -> None:
        """`block` is full and holds the prefix `key` names: later sequences may share it. A
        prefix already cached in another block keeps that one."""
        if self.prefix_caching and key not in self._by_hash and block not in self._hash_of:
            self._by_hash[key], self._hash_of[block] = block, key

    def release(self, blocks: list[int]) -> None:
        """One reference fewer to each of `blocks` (a sequence's table). Unreferenced blocks
        with a hash stay cached, evicted tail first (a prefix's last blocks are the least
        likely to be shared)."""
        for block in reversed(blocks):
            self.refs[block] -= 1
            if self.refs[block] < 0:
                raise RuntimeError(f"block {block} released more often than referenced")
            if self.refs[block] == 0:
                key = self._hash_of.get(block)
                if key is None:
                    self._free.append(block)
                else:
                    self._cached[block] = key

    def forget(self) -> None:
        """Drop every prefix hash (the weights changed, so cached keys and values are stale):
        cached blocks become free, referenced ones are freed when released."""
        self._free.extend(self._cached)
        self._cached.clear()
        self._by_hash.clear()
        self._hash_of.clear()

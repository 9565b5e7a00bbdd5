"""Which sequences run in the next forward, and in which KV-cache blocks.

`Scheduler` owns the waiting queue, the running batch and the block pool
(upcycle.deploy.engine.blocks). Each step it
- admits waiting sequences (first come, first served) while the batch has room and the pool
  holds their prompt and the first `reserve_tokens` of their completion besides what the
  running sequences were promised, sharing the blocks of any cached prefix (a sequence whose
  next prompt block another running sequence is computing waits for it rather than compute it
  twice: the samples of one prompt prefill it once);
- plans one token per decoding sequence plus prefill chunks (at most `max_step_tokens` in all),
  taking blocks as sequences grow; when the pool runs dry, the youngest sequence not yet in the
  step is preempted: its blocks are released and it waits at the head of the queue, to be
  recomputed (its tokens so far are kept, so the output is the same);
- after the forward, registers each newly filled block under its prefix hash.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field

import torch

from upcycle.deploy.engine.blocks import BlockPool, PoolExhausted, block_hash, blocks_for
from upcycle.deploy.engine.kv_cache import StepPlan
from upcycle.deploy.engine.sampling import SamplingParams


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    generator: torch.Generator
    arrived: float = field(default_factory=time.perf_counter)
    last_token_at: float = 0.0  # when its latest token was sampled (0: none yet)
    generated: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)  # its block table
    cached: int = 0  # tokens whose keys/values are in the cache
    committed: int = 0  # leading full blocks registered for prefix caching
    promised: int = 0  # blocks the pool keeps room for at admission (its prompt and reserve)
    keys: list[bytes] = field(default_factory=list)  # prefix hashes of its full blocks so far
    text: str = ""  # text sent so far
    finish_reason: str | None = None
    # the first `settled` generated tokens decode to `settled_text`, which ends on a character
    # boundary: later tokens' bytes cannot change it, so only the rest is decoded each step
    settled: int = 0
    settled_text: str = ""

    @property
    def ids(self) -> list[int]:
        return self.prompt + self.generated

    @property
    def length(self) -> int:
        """len(ids), without building them (read several times a step for every sequence)."""
        return len(self.prompt) + len(self.generated)

    def key_of(self, block: int, block_size: int) -> bytes:
        """The prefix hash of its full block `block` (computed once, chained)."""
        ids = self.ids if len(self.keys) <= block else []
        while len(self.keys) <= block:
            i = len(self.keys)
            parent = self.keys[-1] if self.keys else None
            self.keys.append(block_hash(parent, ids[i * block_size : (i + 1) * block_size]))
        return self.keys[block]


class Scheduler:
    """The waiting queue, the running batch and the block pool of one engine (module doc)."""

    def __init__(
        self,
        *,
        max_num_seqs: int,
        max_step_tokens: int,
        num_blocks: int,
        block_size: int,
        prefix_caching: bool = True,
        reserve_tokens: int = 256,
    ):
        self.max_num_seqs, self.max_step_tokens = max_num_seqs, max_step_tokens
        self.block_size, self.reserve_tokens = block_size, reserve_tokens
        self.pool = BlockPool(num_blocks, block_size, prefix_caching=prefix_caching)
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []
        # totals since start (the engine's metrics read them)
        self.preemptions = 0
        self.prompt_tokens_queried = 0  # prompt tokens of admitted sequences
        self.prompt_tokens_hit = 0  # of which found in the prefix cache
        self.prefill_tokens = 0  # prompt tokens computed (not found cached)

    def abort(self, request_id: str) -> None:
        self.waiting = collections.deque(s for s in self.waiting if s.request_id != request_id)
        for seq in self.running:
            if seq.request_id == request_id:
                seq.finish_reason = "abort"
        self.release_finished()

    def release_finished(self) -> None:
        for seq in self.running:
            if seq.finish_reason is not None:
                self.pool.release(seq.blocks)
                seq.blocks = []
        self.running = [s for s in self.running if s.finish_reason is None]

    def schedule(self) -> tuple[StepPlan, list[Sequence]]:
        """The next step's plan and the sequences it feeds, in plan order."""
        copies: list[tuple[int, int]] = []
        self._admit(copies)
        decoding = [s for s in self.running if s.length - s.cached == 1]
        prefilling = [s for s in self.running if s.length - s.cached > 1]
        budget = max(self.max_step_tokens - len(decoding), 1 if not decoding else 0)
        tokens, tables, offsets, lengths, fed = [], [], [], [], []
        for seq in decoding + prefilling:
            if seq not in self.running:  # preempted for an older sequence's blocks
                continue
            n = seq.length - seq.cached
            prefill = n > 1
            if prefill:
                n = min(n, budget)
                if n == 0:
                    continue
            if not self._reserve(seq, seq.cached + n, fed):
                continue
            if prefill:
                budget -= n
            self.prefill_tokens += max(0, min(seq.cached + n, len(seq.prompt)) - seq.cached)
            tokens += seq.ids[seq.cached : seq.cached + n]
            tables.append(seq.blocks)
            offsets.append(seq.cached)
            lengths.append(n)
            seq.cached += n
            fed.append(seq)
        return StepPlan(tokens, tables, offsets, lengths, copies), fed

    def computed(self, fed: list[Sequence]) -> None:
        """The step that fed `fed` has run: register their newly full blocks."""
        bs = self.block_size
        if not self.pool.prefix_caching:
            return
        for seq in fed:
            while (seq.committed + 1) * bs <= seq.cached:
                key = seq.key_of(seq.committed, bs)
                self.pool.commit(seq.blocks[seq.committed], key)
                seq.committed += 1

    def _admit(self, copies: list[tuple[int, int]]) -> None:
        pending = {k for s in self.running for k in s.keys[s.committed :]}
        # blocks the running sequences were promised and have not taken yet
        owed = sum(max(0, s.promised - len(s.blocks)) for s in self.running)
        deferred = []
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting.popleft()
            admitted = self._place(seq, pending, copies, owed)
            if admitted is None:  # its next prompt block is being computed: wait for it
                deferred.append(seq)
                continue
            if not admitted:  # the pool cannot hold its prompt yet
                self.waiting.appendleft(seq)
                break
            self.running.append(seq)
            pending.update(seq.keys[seq.committed :])
            owed += max(0, seq.promised - len(seq.blocks))
        self.waiting.extendleft(reversed(deferred))

    def _place(self, seq: Sequence, pending: set, copies: list, owed: int) -> bool | None:
        """Give `seq` the cached blocks of its prefix and check the pool, past the `owed`
        blocks, holds the rest of its prompt and reserve: True (placed), False (no room yet:
        nothing taken), None (wait for a block a running sequence is computing)."""
        bs, ids = self.block_size, seq.ids
        keys = []
        if self.pool.prefix_caching:
            keys = [seq.key_of(i, bs) for i in range(len(ids) // bs)]
            hits = next((i for i, k in enumerate(keys) if not self.pool.cached(k)), len(keys))
            if hits < len(keys) and keys[hits] in pending:
                return None
        blocks = self.pool.match(keys)
        cached = len(blocks) * bs
        reserve = min(seq.params.max_tokens - len(seq.generated), self.reserve_tokens)
        promised = blocks_for(len(ids) + max(reserve, 1), bs)
        need = promised - len(blocks)
        if cached == len(ids):  # all cached: the last token is computed again for its logits,
            need += 1  # in a private copy of the last block (which it writes to)
        if self.pool.available - owed < need:
            self.pool.release(blocks)
            return False
        if cached == len(ids):
            private = self.pool.allocate()
            copies.append((blocks[-1], private))
            self.pool.release(blocks[-1:])
            blocks[-1], cached = private, cached - 1
        seq.blocks, seq.cached, seq.committed = blocks, cached, len(blocks)
        seq.promised = promised
        self.prompt_tokens_queried += len(ids)
        self.prompt_tokens_hit += cached
        return True

    def _reserve(self, seq: Sequence, end: int, planned: list[Sequence]) -> bool:
        """Blocks for `seq`'s positions up to `end`, preempting the youngest running sequences
        not in this step while the pool is dry. False if `seq` itself was preempted."""
        while len(seq.blocks) * self.block_size < end:
            try:
                seq.blocks.append(self.pool.allocate())
            except PoolExhausted:
                victim = next(s for s in reversed(self.running) if s not in planned)
                self._preempt(victim)
                if victim is seq:
                    return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.pool.release(seq.blocks)
        seq.blocks, seq.cached, seq.committed = [], 0, 0
        self.running.remove(seq)
        self.waiting.appendleft(seq)
        self.preemptions += 1

"""Compiled steps: `DecodeStep` (every sequence feeds one token) and `PrefillStep` (small prefill
and mixed steps), the same megatron-core modules under torch.compile.

A decode step of a small model is all overhead in eager mode: ~80 megatron module calls in
Python, each a handful of small kernels, for a few matrix-vector products. Compiled, the same
modules (embedding, layers with `CachedAttention` and the MoE layer's `SelectedExperts`, final
norm, output layer) are traced once into one graph of fused kernels (inductor, `fullgraph`): on
a CPU, C++/OpenMP loops and oneDNN GEMMs; on a GPU the graph is captured as a CUDA graph
(mode "reduce-overhead").

Decode shapes are what makes a compiled step reusable: the batch is padded to a bucket (1, 2,
4, 8, ... up to max_num_seqs; padded rows write to a scratch cache block nobody reads) and block
tables to the longest a sequence can have, so each bucket is compiled once; on a CPU the
attended cache length is the one dynamic size (marked so: no recompile as sequences grow), on a
GPU the whole cache is attended, masked, so that each bucket is one CUDA graph (not run here: no
GPU was lent to the session that wrote this). The step index is built from tensors inside the
graph (`StepIndex.decode`).

Prefill and mixed steps vary in every size (tokens, sequences, chunk and cache lengths): one
graph with dynamic shapes covers those of at most `PREFILL_MAX_TOKENS` tokens, its index built
on the host (`StepIndex.of`). Larger steps stay eager, where megatron's MoE layer reads each
used expert's weights once for all its tokens (measured on moe-bench bf16, 2 AMD EPYC threads:
one 64-token prompt 21 ms compiled vs 41 eager, 128 tokens 37 vs 54, four 64-token prompts 77 vs
76). Compiling it costs more than a bucket (7-30 s on 2 cores: the shapes specialise once or
twice, e.g. one sequence against several).

Weights stay live unless frozen: the parameters are graph inputs read at every call, not
constants (inductor's `freezing` folds them in, and would ignore an RLHF weight sync), so an
in-place load is seen by the next step without a recompile. A failure to compile (no C++
compiler, an unsupported op) is the caller's to report (upcycle.deploy.engine.runner), which
then runs eagerly.
"""

from __future__ import annotations

import collections
import itertools
import sys
import types
from collections.abc import Callable

import torch
import torch._inductor.config as inductor_config
from megatron.core import parallel_state
from megatron.core import utils as megatron_utils

from upcycle.deploy.engine.blocks import blocks_for
from upcycle.deploy.engine.kv_cache import KVCache, StepIndex, StepPlan

# prefill and mixed steps of at most this many tokens run compiled (module doc)
PREFILL_MAX_TOKENS = 128


def _compile(fn: Callable, *, backend, device: torch.device, dynamic: bool) -> Callable:
    options = {
        # the model's structure never changes under a runner: guards on its modules (a few
        # hundred per call) are skipped; its tensors stay inputs read at every call
        "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe,
        "triton.cudagraphs": device.type == "cuda" and not dynamic,  # "reduce-overhead"
    }
    # fullgraph: a graph break would leave Python between kernels, so it fails instead (and
    # the runner computes eagerly)
    _silence_group_deprecation()
    return torch.compile(
        _own_copy(fn), backend=backend, options=options if backend == "inductor" else None,
        dynamic=dynamic, fullgraph=True,
    )  # fmt: skip


class Hot:
    """Counts steps per kind (a decode bucket, or prefill) and says when a kind is compiled:
    after `after` eager steps of it (0: at once). Compiling costs seconds, which a short-lived
    engine never earns back; a busy one passes the mark in seconds."""

    def __init__(self, after: int):
        self.after, self.seen = after, collections.Counter()

    def __call__(self, kind) -> bool:
        self.seen[kind] += 1
        return self.seen[kind] > self.after


def buckets(max_num_seqs: int) -> list[int]:
    """Padded batch sizes: powers of two below `max_num_seqs`, then `max_num_seqs` itself."""
    sizes, n = [], 1
    while n < max_num_seqs:
        sizes.append(n)
        n *= 2
    return [*sizes, max_num_seqs]


class DecodeStep:
    """`forward(model, tokens, positions, tables, key_positions)` compiled, at padded batch
    sizes.

    `model` is the runner's `GPTModel` (attention swapped for `CachedAttention` over `cache`),
    `rope` its RoPE angle table [max_len, 1, 1, d]."""

    def __init__(
        self,
        model: torch.nn.Module,
        rope: torch.Tensor,
        *,
        cache: KVCache,
        max_num_seqs: int,
        freeze: bool = False,
        hot: Hot | None = None,
        backend: str | Callable = "inductor",
    ):
        self.model, self.rope, self.block_size = model, rope, cache.block_size
        self.scratch_block = cache.scratch_block
        self.width = blocks_for(rope.shape[0], cache.block_size)  # of a max_model_len sequence
        self.buckets = buckets(max_num_seqs)
        self.hot = hot or Hot(0)
        self.compiled_steps = 0
        self.device = rope.device
        self.frozen = freeze and self.device.type == "cpu"
        # one graph per bucket (static batch, so each is fully specialised and, on a GPU,
        # graph-capturable); the cache length is marked dynamic
        self._compiled = _compile(_decode_forward, backend=backend, device=self.device,
                                  dynamic=False)  # fmt: skip
        torch._dynamo.config.cache_size_limit = max(
            torch._dynamo.config.cache_size_limit, 2 * len(self.buckets)
        )
        self._key_positions = torch.arange(rope.shape[0], device=self.device)

    def bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    def takes(self, n: int) -> bool:
        """Whether a decode step of `n` sequences runs compiled (its bucket is hot)."""
        return self.hot(self.bucket(n))

    def __call__(
        self, tokens: list[int], tables: list[list[int]], positions: list[int]
    ) -> torch.Tensor:
        """Logits [len(tokens), vocab] (fp32) of one token per sequence."""
        n = len(tokens)
        pad = self.bucket(n) - n
        flat = tokens + [0] * pad + positions + [0] * pad
        for table in tables:  # padded to the longest table, padded rows all scratch
            flat += (table + [self.scratch_block] * self.width)[: self.width]
        flat += [self.scratch_block] * (self.width * pad)
        step = torch.tensor(flat, device=self.device)  # one host-to-device copy of the inputs
        b = n + pad
        tokens_t, positions_t = step[:b], step[b : 2 * b]
        tables_t = step[2 * b :].view(b, self.width)
        if self.device.type == "cuda":
            # a CUDA graph is recorded per shape: the whole cache, masked, keeps one per bucket
            key_positions = self._key_positions
        else:
            key_positions = self._key_positions[: max(positions) + 1]
            torch._dynamo.maybe_mark_dynamic(key_positions, 0)
        # frozen: weights folded in as constants, the GEMM ones prepacked for oneDNN, only where
        # they are never loaded again (upcycle.deploy.engine.runner.FREEZE_MAX_BYTES). inductor
        # reads `freezing` from its global config when it compiles, at the first call of each
        # bucket, so it is set around the call
        with inductor_config.patch(freezing=self.frozen):
            logits = self._compiled(self.model, self.rope, tokens_t, positions_t, tables_t,
                                    key_positions, self.block_size)  # fmt: skip
        self.compiled_steps += 1
        return logits[:n]


class PrefillStep:
    """`forward(model, tokens, index)` compiled with dynamic shapes, for prefill and mixed steps
    of at most `PREFILL_MAX_TOKENS` tokens (module doc). Same arguments as `DecodeStep`."""

    def __init__(
        self,
        model: torch.nn.Module,
        rope: torch.Tensor,
        *,
        block_size: int,
        freeze: bool = False,
        hot: Hot | None = None,
        backend: str | Callable = "inductor",
    ):
        self.model, self.rope, self.hot = model, rope, hot or Hot(0)
        self.block_size = block_size
        self.device = rope.device
        self.frozen = freeze and self.device.type == "cpu"
        self.compiled_steps = 0
        self._compiled = _compile(step_forward, backend=backend, device=self.device,
                                  dynamic=True)  # fmt: skip

    def takes(self, plan: StepPlan) -> bool:
        return len(plan.tokens) <= PREFILL_MAX_TOKENS and self.hot("prefill")

    def __call__(self, plan: StepPlan) -> torch.Tensor:
        """Logits [sequences, vocab] (fp32) of each sequence's last token in `plan`."""
        index = StepIndex.of(plan, self.block_size, self.device)
        tokens = torch.tensor(plan.tokens, device=self.device)
        with inductor_config.patch(freezing=self.frozen):
            logits = self._compiled(self.model, self.rope, tokens, index)
        self.compiled_steps += 1
        return logits


def _own_copy(fn: Callable) -> Callable:
    """`fn` with a code object of its own. dynamo keeps compiled graphs per code object, and
    with the module guards skipped (see `DecodeStep`) a second runner in the process would
    otherwise be handed the first one's graphs, and with them its frozen weights."""
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{next(_copies)}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__)


_copies = itertools.count()


def _decode_forward(
    model: torch.nn.Module,
    rope: torch.Tensor,
    tokens: torch.Tensor,
    positions: torch.Tensor,
    tables: torch.Tensor,
    key_positions: torch.Tensor,
    block_size: int,
) -> torch.Tensor:
    index = StepIndex.decode(positions, tables, key_positions, block_size)
    hidden = model.embedding(input_ids=tokens[None, :], position_ids=positions[None, :])
    hidden = model.decoder(hidden, attention_mask=index, rotary_pos_emb=rope[positions])
    return _logits(model, hidden)


def _logits(model: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """fp32 logits [rows, vocab] of hidden states [rows, 1, h] (megatron's output layer)."""
    tied = model.share_embeddings_and_output_weights
    weight = model.shared_embedding_or_output_weight() if tied else None
    logits, _ = model.output_layer(hidden, weight=weight, runtime_gather_output=True)
    return logits[:, 0].float()


def _group_if_none(tp_group, is_expert=False, check_initialized=True):
    """megatron-core's `get_tensor_model_parallel_group_if_none` without its deprecation warning.

    megatron's RowParallelLinear passes `tp_group=None` at every call, and the lookup then warns
    (`warnings.warn` with a warning class: something dynamo cannot trace or replay, so every
    linear would break the graph). Same groups, no warning."""
    if not torch.distributed.is_initialized():
        return None
    if not parallel_state.is_initialized() or tp_group is not None:
        return tp_group
    if is_expert:
        return parallel_state.get_expert_tensor_parallel_group(check_initialized=check_initialized)
    return parallel_state.get_tensor_model_parallel_group(check_initialized=check_initialized)


def _silence_group_deprecation() -> None:
    """Put `_group_if_none` in place of megatron's lookup in every megatron module using it."""
    original = megatron_utils.get_tensor_model_parallel_group_if_none
    for name, module in list(sys.modules.items()):
        if name.startswith("megatron.core") and (
            getattr(module, "get_tensor_model_parallel_group_if_none", None) is original
        ):
            module.get_tensor_model_parallel_group_if_none = _group_if_none


def step_forward(
    model: torch.nn.Module, rope: torch.Tensor | None, tokens: torch.Tensor, index: StepIndex
) -> torch.Tensor:
    """The forward of any step: logits [sequences, vocab] (fp32) of each sequence's last token.
    Eager in the runner; compiled by `PrefillStep`. `rope` None: Dual Chunk Attention rotates
    in `CachedAttention`."""
    hidden = model.embedding(input_ids=tokens[None, :], position_ids=index.positions[None, :])
    rotary = None if rope is None else rope[index.positions]
    hidden = model.decoder(hidden, attention_mask=index, rotary_pos_emb=rotary)
    return _logits(model, hidden[index.last_token])

"""One model replica: the training `GPTModel`, its weights, a KV cache, and the ranks it spans.

With tp * ep == 1 the model lives in the calling process. Otherwise the caller is rank 0 and
starts tp * ep - 1 Ray actors (`FollowerRank`) for the other ranks: they join a torch.distributed
group (gloo on CPU, NCCL on GPU), build the same model under the same `Layout` (megatron-core's
parallel state) and load their shard of the same checkpoint (dist checkpoints reshard on load).
Each step rank 0 broadcasts the `StepPlan` (a few lists of ints) and every rank runs the forward;
megatron's TP/EP collectives do the rest and rank 0 gets the full-vocabulary logits. The
followers are owned by the caller: when a Serve replica dies, Ray takes its followers with it.

Every torch call of a runner must come from one thread (megatron's CPU patches are per thread,
see upcycle.platform.cpu); `upcycle.deploy.engine.batching` keeps it so.
"""

from __future__ import annotations

import datetime
import functools
import shutil
import socket
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
    _yarn_get_concentration_factor_from_config,
)
from pydantic import BaseModel, ConfigDict, Field

from upcycle import runtime
from upcycle.config import ConfigError, Layout, ModelConfig
from upcycle.dense.dual_chunk import DualChunk
from upcycle.deploy.engine import kv_cache, moe_inference
from upcycle.deploy.engine.blocks import blocks_for, default_blocks
from upcycle.deploy.engine.compiled_step import DecodeStep, Hot, PrefillStep, step_forward
from upcycle.deploy.engine.kv_cache import DualChunkRoPE, KVCache, StepIndex, StepPlan
from upcycle.platform.checkpoint import load_checkpoint, read_model_config
from upcycle.platform.cpu import device_rewrites_paused


class RunnerConfig(BaseModel):
    """How one replica holds its model: the `engine` section of a serve spec (pydantic, so the
    spec's errors name `engine.<field>`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    tp: int = Field(default=1, ge=1)
    ep: int = Field(default=1, ge=1)
    max_num_seqs: int = Field(default=16, ge=1)  # sequences decoded together, at most
    max_model_len: int = Field(default=2048, ge=2)  # prompt + completion tokens per sequence
    # the paged KV cache (upcycle.deploy.engine.blocks): tokens per block, and the pool's size per
    # rank in GiB; unset, room for max_num_seqs sequences of max_model_len tokens. Sequences
    # take blocks as they grow; when the pool runs dry the youngest is preempted (recomputed)
    block_size: int = Field(default=16, ge=1)
    kv_cache_gib: float | None = Field(default=None, gt=0)
    # full blocks are shared between sequences with the same prefix (samples of one prompt,
    # a chat's earlier turns) and kept for later ones until the pool needs them
    prefix_caching: bool = True
    # a sequence is admitted when the pool has room for its prompt and this many tokens of its
    # completion (at most its max_tokens) besides what running ones were promised; past that
    # it takes blocks as it grows. Larger: fewer preemptions; smaller: more sequences at once
    reserve_tokens: int = Field(default=256, ge=0)
    max_step_tokens: int = Field(default=512, ge=1)  # prefill tokens per forward (chunks beyond)
    threads: int = Field(default=0, ge=0)  # torch threads per rank; 0 keeps torch's default
    cpus_per_rank: float = Field(default=1.0, gt=0)  # Ray CPUs reserved for each rank
    gpus_per_rank: float = Field(default=0.0, ge=0)  # Ray GPUs per rank (1 on GPU clusters)
    # Dual Chunk Attention past the trained context: 0 is off; else the length the model was
    # trained at (chunk 3/4 of it, local window 1/16; upcycle.dense.dual_chunk)
    dual_chunk_length: int = Field(default=0, ge=0)
    # weights and KV cache; logits and sampling are fp32 either way. auto: bf16 on a GPU, fp32
    # on a CPU (bf16 there is opt-in: fast with AMX, refused without AVX512-BF16/AMX)
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    # decode and small prefill steps through torch.compile (upcycle.deploy.engine.compiled_step).
    # on: from the first step; auto: a kind of step (a batch size, prefill) once it has run
    # AUTO_COMPILE_AFTER times eagerly (one-rank replicas without Dual Chunk Attention, with a
    # GPU or a C++ compiler); off: never
    compile: Literal["auto", "on", "off"] = "auto"

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "bfloat16" or (self.dtype == "auto" and runtime.has_cuda()):
            return torch.bfloat16
        return torch.float32

    def kv_blocks(self, cfg: ModelConfig) -> int:
        """Blocks in each rank's KV pool for model `cfg`."""
        if self.kv_cache_gib is None:
            return default_blocks(self.max_num_seqs, self.max_model_len, self.block_size)
        kv_heads = max(cfg.num_kv_heads // self.tp, 1)
        size = torch.tensor([], dtype=self.torch_dtype).element_size()
        block_bytes = 2 * cfg.num_layers * kv_heads * cfg.head_dim * self.block_size * size
        return int(self.kv_cache_gib * 2**30 // block_bytes)

    def fit_context(self, cfg: ModelConfig, default: int | None = None) -> RunnerConfig:
        """This config with `max_model_len`, when left unset, at `default` (else the field's
        default) or model `cfg`'s context where that is shorter. A value someone set is kept,
        and `check` judges it."""
        if "max_model_len" in self.model_fields_set or self.dual_chunk_length:
            return self
        wanted = min(default or self.max_model_len, cfg.max_position_embeddings)
        return self.model_copy(update={"max_model_len": wanted})

    def check(self, cfg: ModelConfig) -> None:
        """Raise ConfigError("engine.<field>", ...) if this does not fit model `cfg` or this
        machine (bf16 where it is not native)."""
        if cfg.is_reward_model:
            raise ConfigError(
                "model",
                f"{cfg.name} is a reward model (head 'score'): it scores text, it does not "
                "generate; use `upcycle reward score`",
            )
        if self.dtype == "bfloat16" and not runtime.bf16_supported():
            raise ConfigError("engine.dtype", f"{runtime.NO_BF16}: use float32")
        if self.dual_chunk_length:
            if not 16 <= self.dual_chunk_length <= cfg.max_position_embeddings:
                raise ConfigError(
                    "engine.dual_chunk_length",
                    f"{self.dual_chunk_length}: the trained context length, between 16 and the "
                    f"model's max_position_embeddings ({cfg.max_position_embeddings})",
                )
        elif self.max_model_len > cfg.max_position_embeddings:
            raise ConfigError(
                "engine.max_model_len",
                f"{self.max_model_len} exceeds the model's max_position_embeddings "
                f"{cfg.max_position_embeddings}; set engine.dual_chunk_length to go beyond it",
            )
        per_seq = blocks_for(self.max_model_len, self.block_size)
        if self.kv_blocks(cfg) < per_seq:
            raise ConfigError(
                "engine.kv_cache_gib",
                f"{self.kv_cache_gib} GiB holds {self.kv_blocks(cfg)} blocks of "
                f"{self.block_size} tokens; one sequence of max_model_len {self.max_model_len} "
                f"needs {per_seq}: raise kv_cache_gib to >= "
                f"{self.kv_cache_gib * per_seq / max(self.kv_blocks(cfg), 1):.3g} or lower "
                "engine.max_model_len",
            )
        if self.compile == "on" and (self.dual_chunk_length or self.tp * self.ep > 1):
            raise ConfigError(
                "engine.compile",
                "on: compiled steps cover one-rank replicas without Dual Chunk Attention "
                "(tp = ep = 1, dual_chunk_length 0); use auto or off",
            )
        # sequence parallelism is a training-time requirement of megatron's MoE layer (it
        # asserts it only in training); serving runs without it, so the check assumes it on.
        layout = Layout(tp=self.tp, ep=self.ep, sequence_parallel=True)
        try:
            layout.resolve(self.tp * self.ep).check_model(cfg)
        except ConfigError as e:
            field = e.field.replace("layout.", "engine.")
            raise ConfigError(field, str(e).split(": ", 1)[1]) from None


# Compiled steps fold the weights in (inductor's freezing: oneDNN-prepacked GEMM weights, 2.55 ->
# 1.97 ms a decode step at 1 stream on moe-bench bf16) only for models up to this size: each
# compiled graph keeps prepacked copies of its GEMM weights (+52 MiB over 5 batch buckets on
# moe-bench's 50 MiB), which a model of GBs cannot afford and, bandwidth-bound, gains less from.
FREEZE_MAX_BYTES = 1 << 30

# `engine.compile: auto` compiles a kind of step (a batch bucket, prefill) after this many eager
# steps of it: ~2-4 s of eager decoding on a small model, about what one compile costs on 2 cores
AUTO_COMPILE_AFTER = 256


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class ModelRunner:
    """Rank `rank` of a replica: builds the model and runs `forward(plan)`.

    `source` is our checkpoint folder, or a `ModelConfig` for freshly initialised weights (the
    GPU decode benchmark: no multi-GB checkpoint to write first; one rank only). `live_weights`:
    new weights will arrive (`load_weights`, RLHF), so a compiled decode step must read them at
    every call rather than fold them in (upcycle.deploy.engine.compiled_step).
    """

    def __init__(
        self,
        source: Path | ModelConfig,
        rc: RunnerConfig,
        *,
        rank: int = 0,
        master: str = "",
        live_weights: bool = False,
    ):
        from upcycle.dense.megatron_config import to_transformer_config
        from upcycle.moe.model import build_model
        from upcycle.platform.distributed import init_parallel_state

        if rc.threads:
            torch.set_num_threads(rc.threads)
        ckpt = None if isinstance(source, ModelConfig) else Path(source)
        self.cfg = source if ckpt is None else read_model_config(ckpt)
        self.rc, self.rank = rc, rank
        rc.check(self.cfg)
        self.world = rc.tp * rc.ep
        self._followers: list = []
        if rank == 0 and self.world > 1:
            if ckpt is None:
                raise ValueError("a multi-rank runner needs a checkpoint every rank can load")
            master = f"{_node_ip()}:{_free_port()}"
            self._followers = _start_followers(ckpt, rc, master)
        if not dist.is_initialized():
            dist.init_process_group(
                runtime.distributed_backend(),
                init_method=f"tcp://{master or f'127.0.0.1:{_free_port()}'}",
                world_size=self.world,
                rank=rank,
                timeout=datetime.timedelta(minutes=10),
            )
        self.layout = layout = init_parallel_state(Layout(tp=rc.tp, ep=rc.ep))
        dtype = rc.torch_dtype
        tconfig = to_transformer_config(self.cfg, layout, params_dtype=dtype)
        self.model = build_model(self.cfg, tconfig).to(runtime.device()).eval()
        if ckpt is not None:
            load_checkpoint(self.model, ckpt)
        if self.world == 1:  # under TP/EP the MoE collectives stay megatron's
            moe_inference.install(self.model)
        attn = self.model.decoder.layers[0].self_attention
        self.num_blocks = rc.kv_blocks(self.cfg)
        self.cache = KVCache(
            self.cfg.num_layers,
            self.num_blocks,
            rc.block_size,
            attn.num_query_groups_per_partition,
            self.cfg.head_dim,
            dtype,
            runtime.device(),
        )
        self._state = kv_cache.install(self.model, self.cache)
        self._rope = None  # megatron applies RoPE from this table, or DCA does its own
        if rc.dual_chunk_length:
            dca = DualChunk.for_trained_length(rc.dual_chunk_length)
            self._state["dual_chunk"] = DualChunkRoPE(
                dca,
                _rope_table(self.model, dca.chunk_size + 1),
                tconfig,
                _yarn_get_concentration_factor_from_config(tconfig),
            )
        else:
            self._rope = _rope_table(self.model, rc.max_model_len)
        self._decode: DecodeStep | None = None
        self._prefill: PrefillStep | None = None
        if _compile_wanted(rc, self.world):
            weight_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
            self._compile_steps(freeze=not live_weights and weight_bytes <= FREEZE_MAX_BYTES)

    def _compile_steps(self, *, freeze: bool) -> None:
        hot = Hot(AUTO_COMPILE_AFTER if self.rc.compile == "auto" else 0)
        self._decode = DecodeStep(self.model, self._rope, cache=self.cache, hot=hot,
                                  max_num_seqs=self.rc.max_num_seqs, freeze=freeze)  # fmt: skip
        self._prefill = PrefillStep(self.model, self._rope, block_size=self.rc.block_size,
                                    freeze=freeze, hot=hot)  # fmt: skip

    @property
    def compiled_steps(self) -> int:
        """Steps this runner ran compiled (0 after a fallback)."""
        steps = (self._decode, self._prefill)
        return sum(step.compiled_steps for step in steps if step is not None)

    def forward(self, plan: StepPlan) -> torch.Tensor:
        """Logits [num_seqs, vocab] (fp32, on the CPU) of each sequence's last token in `plan`
        (rank 0: the plan goes to the followers first)."""
        if self.world > 1:
            dist.broadcast_object_list([plan], src=0)
        return self._compute(plan)

    def load_weights(self, full: dict[str, torch.Tensor]) -> int:
        """New weights in memory: full (one-process) tensors by name, each rank taking its
        piece for this replica's layout (an RLHF weight sync, upcycle.rlhf.sync); rank 0 hands
        them to the followers first. The bytes this rank copied."""
        if self.world > 1:
            dist.broadcast_object_list([_Weights(full)], src=0)
        if self._decode is not None and self._decode.frozen:
            # frozen steps hold the old weights as constants: one recompile, live from now
            self._compile_steps(freeze=False)
        return self._load(full)

    def follow(self) -> None:
        """A follower's life: run each broadcast plan (or load broadcast weights) until rank 0
        sends `None`."""
        while True:
            box = [None]
            dist.broadcast_object_list(box, src=0)
            if box[0] is None:
                return
            if isinstance(box[0], _Weights):
                self._load(box[0].full)
            else:
                self._compute(box[0])

    @torch.no_grad()
    def _load(self, full: dict[str, torch.Tensor]) -> int:
        from upcycle.conversion.shards import check_chunk, plan, take, this_rank

        shards = plan(self.cfg, self.layout, this_rank(self.layout))
        tensors = check_chunk(self.model, shards)
        nbytes = 0
        for s in shards:
            if s.key not in full:
                raise KeyError(f"weight sync: no tensor {s.key!r} arrived")
            piece = take(full[s.key], s)
            tensors[s.local].copy_(piece)
            nbytes += piece.numel() * piece.element_size()
        return nbytes

    @torch.no_grad()
    def _compute(self, plan: StepPlan) -> torch.Tensor:
        with device_rewrites_paused():
            return self._forward(plan)

    def _forward(self, plan: StepPlan) -> torch.Tensor:
        self.cache.copy(plan.copies)
        compiled = self._compiled_step(plan)
        if compiled is not None:
            try:
                return compiled().cpu()
            except Exception as e:  # noqa: BLE001 - any compile failure: eager from here on
                self._decode = self._prefill = None
                warnings.warn(
                    f"engine.compile: a compiled step failed ({_reason(e)}); running eagerly",
                    RuntimeWarning,
                    stacklevel=2,
                )
        device = runtime.device()
        tokens = torch.tensor(plan.tokens, device=device)
        index = StepIndex.of(plan, self.rc.block_size, device)
        return step_forward(self.model, self._rope, tokens, index).cpu()

    def _compiled_step(self, plan: StepPlan) -> Callable[[], torch.Tensor] | None:
        """The compiled step that takes `plan`, if any (upcycle.deploy.engine.compiled_step)"""
        n = len(plan.tables)
        if self._decode is not None and len(plan.tokens) == n and self._decode.takes(n):
            return functools.partial(self._decode, plan.tokens, plan.tables, plan.offsets)
        if self._prefill is not None and self._prefill.takes(plan):
            return functools.partial(self._prefill, plan)
        return None


class _Weights:
    """What rank 0 broadcasts to its followers in place of a plan: new weights."""

    def __init__(self, full: dict[str, torch.Tensor]):
        self.full = full


def _rope_table(model: torch.nn.Module, length: int) -> torch.Tensor:
    """megatron-core's RoPE angles [length, 1, 1, head_dim] (YaRN's come with its cos/sin factor,
    which megatron's attention reads from the config)."""
    table = model.rotary_pos_emb(length)
    return table[0] if isinstance(table, tuple) else table


def _reason(error: BaseException) -> str:
    """The root cause of a compile failure in one line (dynamo wraps a backend's error)."""
    while (inner := getattr(error, "inner_exception", None) or error.__cause__) is not None:
        error = inner
    lines = [line for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def _compile_wanted(rc: RunnerConfig, world: int) -> bool:
    """Whether this replica decodes through `DecodeStep` (`engine.compile`)."""
    if rc.compile == "off" or rc.dual_chunk_length:
        return False
    return rc.compile == "on" or (
        world == 1 and (runtime.has_cuda() or shutil.which("g++") is not None)
    )


def _node_ip() -> str:
    import ray

    return ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"


def _start_followers(ckpt: Path, rc: RunnerConfig, master: str) -> list:
    import ray

    follower = ray.remote(
        num_cpus=rc.cpus_per_rank,
        num_gpus=rc.gpus_per_rank,
        runtime_env={"env_vars": runtime.ENGINE_THREAD_ENV},
    )(FollowerRank)
    actors = [follower.remote() for _ in range(rc.tp * rc.ep - 1)]
    for rank, actor in enumerate(actors, start=1):
        actor.run.remote(str(ckpt), rc, rank, master)
    return actors


class FollowerRank:
    """Ranks 1..N-1 of a replica: build the model, then run every plan rank 0 broadcasts."""

    def run(self, ckpt: str, rc: RunnerConfig, rank: int, master: str) -> None:
        from upcycle.platform.cpu import apply_cpu_patches

        apply_cpu_patches()
        ModelRunner(Path(ckpt), rc, rank=rank, master=master).follow()

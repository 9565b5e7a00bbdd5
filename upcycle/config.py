"""Model presets and the parallel layout: the two typed configs everything else is built from.

`ModelConfig` is small and frozen; translating it to megatron-core's `TransformerConfig` happens in
exactly one place (`upcycle.dense.megatron_config`). Errors name the field, the bad value and the fix.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and what is allowed."""

    def __init__(self, field_name: str, message: str):
        self.field, self.message = field_name, message
        super().__init__(f"{field_name}: {message}")

    def __reduce__(self):  # raised inside Ray tasks: must survive pickling
        return type(self), (self.field, self.message)


HEADS = ("lm", "score")


@dataclass(frozen=True)
class ModelConfig:
    """A Qwen2-family decoder: dense when `num_experts == 0`, Qwen2-MoE otherwise."""

    name: str
    # Shape of the transformer
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    ffn_hidden_size: int = 0  # dense SwiGLU width; 0 for MoE models (every layer is sparse)
    # Mixture of experts (Qwen2-MoE block: routed experts plus a gated shared expert)
    num_experts: int = 0
    moe_top_k: int = 0
    moe_ffn_hidden_size: int = 0
    shared_expert_ffn_hidden_size: int = 0  # 0: no shared expert
    shared_expert_gate: bool = True
    norm_topk_prob: bool = False
    router_aux_loss_coef: float = 0.001
    # Everything else Qwen2 fixes
    tie_embeddings: bool = False
    qkv_bias: bool = True
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    init_std: float = 0.02
    # YaRN RoPE scaling (transformers' rope_type "yarn"): 1.0 is plain RoPE. With a factor s > 1
    # the model was trained at `yarn_original_max_position_embeddings` and runs at s times that.
    yarn_factor: float = 1.0
    yarn_original_max_position_embeddings: int = 0
    # The last layer: "lm", next-token logits over the vocabulary; "score", one scalar per
    # position (a reward model, transformers' *ForSequenceClassification with one label)
    head: str = "lm"

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def is_reward_model(self) -> bool:
        return self.head == "score"

    def as_reward_model(self) -> ModelConfig:
        """The same backbone with a score head (nothing left to tie the embedding to)."""
        return self.replace(head="score", tie_embeddings=False)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (validated like any config)."""
        unknown = sorted(set(changes) - {f.name for f in fields(self)})
        if unknown:
            raise ConfigError(unknown[0], f"unknown field; valid fields: {_field_names()}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ConfigError(unknown[0], f"unknown field; valid fields: {_field_names()}")
        missing = [f.name for f in fields(cls) if f.name not in data and _is_required(f)]
        if missing:
            raise ConfigError(missing[0], "missing; it has no default")
        return cls(**data)

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> ModelConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))


def _is_required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _field_names() -> str:
    return ", ".join(f.name for f in fields(ModelConfig))


def _validate(c: ModelConfig) -> None:
    for name in ("vocab_size", "hidden_size", "num_layers", "num_attention_heads", "num_kv_heads"):
        if getattr(c, name) <= 0:
            raise ConfigError(name, f"must be a positive integer, got {getattr(c, name)}")
    if c.hidden_size % c.num_attention_heads:
        raise ConfigError(
            "hidden_size",
            f"{c.hidden_size} is not divisible by num_attention_heads ({c.num_attention_heads}); "
            "choose a multiple of the head count",
        )
    if c.num_attention_heads % c.num_kv_heads:
        raise ConfigError(
            "num_kv_heads",
            f"num_attention_heads ({c.num_attention_heads}) is not divisible by num_kv_heads "
            f"({c.num_kv_heads}); allowed: {_divisors(c.num_attention_heads)}",
        )
    if c.head not in HEADS:
        raise ConfigError("head", f"{c.head!r}; allowed: {HEADS}")
    if c.head == "score" and c.tie_embeddings:
        raise ConfigError(
            "tie_embeddings", "a score head has no output embedding to tie to; set it false"
        )
    if c.num_experts < 0:
        raise ConfigError("num_experts", f"must be >= 0 (0 means dense), got {c.num_experts}")
    if c.is_moe:
        if not 1 <= c.moe_top_k <= c.num_experts:
            raise ConfigError(
                "moe_top_k", f"must be in 1..num_experts ({c.num_experts}), got {c.moe_top_k}"
            )
        if c.moe_ffn_hidden_size <= 0:
            raise ConfigError("moe_ffn_hidden_size", "must be positive for a MoE model")
        if c.shared_expert_ffn_hidden_size < 0:
            raise ConfigError("shared_expert_ffn_hidden_size", "must be >= 0 (0: no shared expert)")
        if c.ffn_hidden_size:
            raise ConfigError(
                "ffn_hidden_size", "must be 0 for a MoE model (every layer is sparse in Qwen2-MoE)"
            )
        if c.router_aux_loss_coef < 0:
            raise ConfigError("router_aux_loss_coef", f"must be >= 0, got {c.router_aux_loss_coef}")
    else:
        if c.ffn_hidden_size <= 0:
            raise ConfigError("ffn_hidden_size", "must be positive for a dense model")
        for name in ("moe_top_k", "moe_ffn_hidden_size", "shared_expert_ffn_hidden_size"):
            if getattr(c, name):
                raise ConfigError(name, "must be 0 for a dense model (num_experts == 0)")
    if c.head_dim % 2:
        raise ConfigError("hidden_size", f"head dim {c.head_dim} must be even for RoPE")
    if c.rope_theta <= 0 or c.rms_norm_eps <= 0 or c.init_std <= 0:
        raise ConfigError("rope_theta", "rope_theta, rms_norm_eps and init_std must be positive")
    if c.yarn_factor < 1:
        raise ConfigError("yarn_factor", f"must be >= 1 (1: no YaRN scaling), got {c.yarn_factor}")
    if c.yarn_factor > 1 and c.yarn_original_max_position_embeddings <= 0:
        raise ConfigError(
            "yarn_original_max_position_embeddings",
            "must be the pretraining context length (e.g. 32768) when yarn_factor > 1",
        )


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


_QWEN2_VOCAB = 151936  # 151,646 tokens padded (0.5b, 1.5b, 57b-a14b, tiny presets)
_QWEN2_VOCAB_LARGE = 152064  # 7b, 72b

PRESETS: dict[str, ModelConfig] = {
    c.name: c
    for c in (
        ModelConfig("qwen2-0.5b", _QWEN2_VOCAB, 896, 24, 14, 2, 4864, tie_embeddings=True,
                    max_position_embeddings=131072),
        ModelConfig("qwen2-1.5b", _QWEN2_VOCAB, 1536, 28, 12, 2, 8960, tie_embeddings=True,
                    max_position_embeddings=131072),
        ModelConfig("qwen2-7b", _QWEN2_VOCAB_LARGE, 3584, 28, 28, 4, 18944,
                    max_position_embeddings=131072),
        ModelConfig("qwen2-72b", _QWEN2_VOCAB_LARGE, 8192, 80, 64, 8, 29568,
                    max_position_embeddings=131072),
        ModelConfig("qwen2-57b-a14b", _QWEN2_VOCAB, 3584, 28, 28, 4, num_experts=64, moe_top_k=8,
                    moe_ffn_hidden_size=2560, shared_expert_ffn_hidden_size=20480,
                    max_position_embeddings=131072),
        ModelConfig("qwen1.5-moe-a2.7b", _QWEN2_VOCAB, 2048, 24, 16, 16, num_experts=60,
                    moe_top_k=4, moe_ffn_hidden_size=1408, shared_expert_ffn_hidden_size=5632,
                    max_position_embeddings=8192),
        # CPU-sized presets with the real vocabulary, so the real tokenizer feeds them.
        ModelConfig("tiny-dense", _QWEN2_VOCAB, 64, 2, 4, 2, 256, tie_embeddings=True,
                    max_position_embeddings=2048),
        ModelConfig("tiny-moe", _QWEN2_VOCAB, 64, 2, 4, 2, num_experts=8, moe_top_k=2,
                    moe_ffn_hidden_size=64, shared_expert_ffn_hidden_size=256,
                    tie_embeddings=True, max_position_embeddings=2048),
    )
}  # fmt: skip


def from_name(name: str) -> ModelConfig:
    """The preset called `name`; the error lists the valid names."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(
            "model", f"unknown preset {name!r}; valid: {', '.join(PRESETS)}"
        ) from None


@dataclass(frozen=True)
class Layout:
    """Parallel sizes of one job. `dp=-1` means: whatever the world size leaves.

    The world is tp * pp * dp ranks (megatron-core's dense grid); expert parallelism folds
    ep * etp ranks out of the tp * dp ranks of the same pipeline stage. `etp=0` means "the same
    as tp" (megatron-core's default).
    """

    tp: int = 1
    pp: int = 1
    vpp: int = 1
    ep: int = 1
    etp: int = 0
    dp: int = -1
    sequence_parallel: bool = False
    micro_batch_size: int = 1
    global_batch_size: int = 0  # 0: one micro-batch per data-parallel rank

    def resolve(self, world_size: int) -> Layout:
        """The same layout with dp derived from (and checked against) `world_size`."""
        for name in ("tp", "pp", "vpp", "ep", "micro_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"layout.{name}", f"must be >= 1, got {getattr(self, name)}")
        if self.etp < 0:
            raise ConfigError("layout.etp", f"must be >= 1 (or 0: same as tp), got {self.etp}")
        model_parallel = self.tp * self.pp
        if world_size % model_parallel:
            raise ConfigError(
                "layout",
                f"world size {world_size} is not divisible by tp*pp = {model_parallel}",
            )
        dp = world_size // model_parallel
        if self.dp not in (-1, dp):
            raise ConfigError(
                "layout.dp",
                f"{self.dp} does not match world size {world_size} / (tp*pp = {model_parallel}) = {dp}",
            )
        if (self.tp * dp) % (self.ep * self.expert_tp):
            raise ConfigError(
                "layout.ep",
                f"ep*etp = {self.ep * self.expert_tp} must divide tp*dp = {self.tp * dp} ranks per stage",
            )
        step = self.micro_batch_size * dp
        gbs = self.global_batch_size or step
        if gbs < 1 or gbs % step:
            raise ConfigError(
                "layout.global_batch_size",
                f"{self.global_batch_size} must be a multiple of micro_batch_size*dp = {step}",
            )
        return dataclasses.replace(self, dp=dp, etp=self.expert_tp, global_batch_size=gbs)

    @property
    def expert_tp(self) -> int:
        """Tensor-parallel size of the experts (`etp`, or tp when etp is 0)."""
        return self.etp or self.tp

    @property
    def world_size(self) -> int:
        if self.dp < 1:
            raise ConfigError("layout.dp", "not resolved yet; call resolve(world_size) first")
        return self.tp * self.pp * self.dp

    def check_model(self, model: ModelConfig) -> None:
        """Raise if this layout does not divide `model`."""
        if model.num_attention_heads % self.tp:
            raise ConfigError(
                "layout.tp",
                f"num_attention_heads ({model.num_attention_heads}) must be a multiple of tp "
                f"({self.tp}); allowed tp: {_divisors(model.num_attention_heads)}",
            )
        if model.num_kv_heads % self.tp:
            raise ConfigError(
                "layout.tp",
                f"num_kv_heads ({model.num_kv_heads}) must be a multiple of tp ({self.tp}); "
                f"allowed tp: {_divisors(model.num_kv_heads)}",
            )
        if model.num_layers % (self.pp * self.vpp):
            raise ConfigError(
                "layout.pp",
                f"num_layers ({model.num_layers}) must be divisible by pp*vpp ({self.pp * self.vpp})",
            )
        if model.is_moe:
            if model.num_experts % self.ep:
                raise ConfigError(
                    "layout.ep",
                    f"num_experts ({model.num_experts}) must be divisible by ep ({self.ep}); "
                    f"allowed ep: {_divisors(model.num_experts)}",
                )
            if self.tp > 1 and not self.sequence_parallel:
                raise ConfigError(
                    "layout.sequence_parallel",
                    "must be true when tp > 1 on a MoE model (megatron-core requires it)",
                )
            if self.ep == 1 and self.expert_tp < self.tp:
                # megatron-core 0.16.1 tags expert weights for the dense gradient all-reduce when
                # ep == 1, so with etp < tp their gradients miss the other TP ranks' tokens
                # (measured: 0.6-0.7x the single-process expert gradients).
                raise ConfigError(
                    "layout.etp",
                    f"etp={self.expert_tp} < tp={self.tp} needs ep > 1; with ep=1 use etp=tp "
                    "(megatron-core 0.16.1 would reduce the expert gradients over the wrong group)",
                )
        elif self.ep > 1 or self.expert_tp not in (1, self.tp):
            raise ConfigError("layout.ep", "a dense model has no experts: leave ep and etp unset")
        width = model.moe_ffn_hidden_size if model.is_moe else model.ffn_hidden_size
        if width % (self.expert_tp if model.is_moe else self.tp):
            raise ConfigError("layout.etp", f"FFN width {width} is not divisible by its TP size")

    @classmethod
    def from_dict(cls, data: dict[str, Any], prefix: str = "layout") -> Layout:
        return section_from_dict(cls, data, prefix)


def check_spec_fields(cls, data: Any, what: str, required: tuple[str, ...]) -> None:
    """A job spec's top level (`what`: "job", "rlhf"): a mapping of `cls`'s fields holding every
    `required` one; errors name the field."""
    if not isinstance(data, dict):
        raise ConfigError(what, f"must be a mapping, got {type(data).__name__}")
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(unknown[0], f"unknown field; valid fields: {sorted(names)}")
    for name in required:
        if name not in data:
            raise ConfigError(name, "missing; it has no default")


def section_from_dict(cls, data: dict[str, Any], prefix: str):
    """Build a config dataclass from a mapping; errors name `prefix.field`."""
    if not isinstance(data, dict):
        raise ConfigError(prefix, f"must be a mapping, got {type(data).__name__}")
    names = [f.name for f in fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"{prefix}.{unknown[0]}", f"unknown field; valid fields: {names}")
    return cls(**data)

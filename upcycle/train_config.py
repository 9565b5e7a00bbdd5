"""The sections of a training job spec besides the model and the layout: schedule and numerics
(`train`), long-context continued pretraining, and the SFT and DPO settings. Each is frozen, read
from a mapping whose errors name `section.field`, and travels to Ray workers as plain data.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any

from upcycle.config import ConfigError, ModelConfig, section_from_dict


@dataclass(frozen=True)
class TrainConfig:
    """What one training job does: schedule, optimizer, numerics, checkpoints.

    The LR schedule is linear warmup to `lr` over `warmup_steps`, then cosine decay to `min_lr`
    at `steps`. `stop_at_step` ends the job early without changing that schedule (a later job
    with the same name resumes it).
    """

    steps: int = 20
    seq_length: int = 128
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 2
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    seed: int = 1234
    save_interval: int = 0  # 0: only at the end
    keep_checkpoints: int = 0  # the newest N step checkpoints stay, older ones go; 0: all
    expert_load_interval: int = 50  # MoE: layers x experts token matrix artifact; 0: at the end
    log_interval: int = 0  # a console line every N steps; 0: about ten a job (MLflow: every step)
    stop_at_step: int = 0  # 0: run all `steps`
    token_dispatcher: str = "alltoall"
    dtype: str = "auto"  # auto: bf16 on GPU, fp32 on CPU
    fp8: str | None = None  # hybrid | e4m3 (Transformer Engine on a CUDA device)
    fp8_recipe: str = "delayed"
    threads_per_worker: int = 1
    peak_flops: float = 0.0  # for MFU; 0: the GPU's bf16 peak, or a measured GEMM on CPU

    def __post_init__(self) -> None:
        for name in ("steps", "seq_length", "threads_per_worker"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name}", f"must be >= 1, got {getattr(self, name)}")
        for name in (
            "warmup_steps", "save_interval", "keep_checkpoints", "expert_load_interval", "log_interval",
            "stop_at_step", "clip_grad", "min_lr",
        ):  # fmt: skip
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name}", f"must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0 or self.min_lr > self.lr:
            raise ConfigError("train.lr", f"need 0 <= min_lr <= lr and lr > 0, got {self.lr}")
        if self.warmup_steps > self.steps:
            raise ConfigError("train.warmup_steps", f"{self.warmup_steps} > steps ({self.steps})")
        choices = {
            "token_dispatcher": ("alltoall", "allgather"),
            "dtype": ("auto", "fp32", "bf16"),
            "fp8": (None, "hybrid", "e4m3"),
            "fp8_recipe": ("delayed", "tensorwise", "mxfp8", "blockwise"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"train.{name}", f"{getattr(self, name)!r}; allowed: {allowed}")

    @classmethod
    def from_dict(cls, data: dict[str, Any], prefix: str = "train") -> TrainConfig:
        return section_from_dict(cls, data, prefix)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class LongContext:
    """Long-context continued pretraining: the model trains (and is then served) with a larger
    RoPE base and position limit; `train.seq_length` sets the longer sequences. Qwen2 went from
    4,096 to 32,768 tokens with the base raised from 10,000 to 1,000,000."""

    rope_theta: float
    max_position_embeddings: int

    def __post_init__(self) -> None:
        if self.rope_theta <= 0:
            raise ConfigError("long_context.rope_theta", f"must be > 0, got {self.rope_theta}")
        if self.max_position_embeddings < 1:
            raise ConfigError(
                "long_context.max_position_embeddings",
                f"must be >= 1, got {self.max_position_embeddings}",
            )

    def apply(self, model: ModelConfig) -> ModelConfig:
        return model.replace(
            rope_theta=self.rope_theta, max_position_embeddings=self.max_position_embeddings
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LongContext:
        missing = [f.name for f in fields(cls) if isinstance(data, dict) and f.name not in data]
        if missing:
            raise ConfigError(f"long_context.{missing[0]}", "missing; it has no default")
        return section_from_dict(cls, data, "long_context")


@dataclass(frozen=True)
class SftConfig:
    """Supervised fine-tuning: `pack` fills each row with several conversations (kept apart by
    an attention mask); false gives each conversation a row of its own (plain causal attention,
    which Transformer Engine's fused attention also runs)."""

    pack: bool = True

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SftConfig:
        return section_from_dict(cls, data, "sft")


@dataclass(frozen=True)
class DpoConfig:
    """Direct Preference Optimization: `beta` scales the implicit reward
    beta * (log pi(y|x) - log pi_ref(y|x)); the frozen reference is `reference` (our
    checkpoint), by default the job's `init_from` (the SFT model DPO starts from)."""

    beta: float = 0.1
    reference: str | None = None

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise ConfigError("dpo.beta", f"must be > 0 (typical: 0.01 to 0.5), got {self.beta}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DpoConfig:
        return section_from_dict(cls, data, "dpo")

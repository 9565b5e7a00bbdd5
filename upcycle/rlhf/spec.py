"""An online RLHF job: the policy, its prompts, how it samples, who scores, what it minimises.

Plain data that travels to the trainer's Ray workers as a dict; `validate` checks it against the
trainer's world size (and reads the prompts and the starting checkpoint) before any actor
starts, so a bad spec costs no cluster time and its error names the field.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from upcycle.config import ConfigError, Layout, ModelConfig, check_spec_fields, section_from_dict
from upcycle.synthesis.sandbox.run import KINDS
from upcycle.train_config import DpoConfig, TrainConfig

OBJECTIVES = ("online_dpo", "grpo")
VERIFIER_SCORERS = ("exact", "execution")  # upcycle.synthesis.verifiers, one sample at a time
_DERIVED = ("steps", "seq_length", "save_interval", "stop_at_step")  # train fields the job sets


@dataclass(frozen=True)
class RolloutConfig:
    """The rollout engines: `workers` Ray actors, each a serving engine at its own tp/ep that
    samples `samples` (K) responses per prompt."""

    workers: int = 1
    tp: int = 1
    ep: int = 1
    samples: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 64
    max_num_seqs: int = 64  # sequences an engine decodes together
    threads: int = 1  # torch threads per engine rank
    cpus_per_rank: float = 1.0
    gpus_per_rank: float = 0.0
    compile: str = (
        "auto"  # the engine's decode step: auto | on | off (upcycle.deploy.engine.runner)
    )
    prefix_caching: bool = (
        True  # a prompt's K samples share its KV blocks (upcycle.deploy.engine.blocks)
    )

    def __post_init__(self) -> None:
        if self.compile not in ("auto", "on", "off"):
            raise ConfigError("rollout.compile", f"{self.compile!r}: auto, on or off")
        for name in ("workers", "tp", "ep", "max_tokens", "max_num_seqs", "threads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"rollout.{name}", f"must be >= 1, got {getattr(self, name)}")
        if self.samples < 2:
            raise ConfigError(
                "rollout.samples",
                f"{self.samples}: online DPO pairs a prompt's best and worst response and GRPO "
                "normalises over a prompt's group, so each prompt needs K >= 2 samples",
            )

    def runner(self, max_model_len: int) -> dict:
        """The engine's `RunnerConfig` fields (upcycle.deploy.engine.runner); fp32 weights, so a
        synced engine computes what the trainer's fp32 model computes."""
        return dict(tp=self.tp, ep=self.ep, max_num_seqs=self.max_num_seqs,
                    max_model_len=max_model_len, max_step_tokens=max(512, max_model_len),
                    threads=self.threads, cpus_per_rank=self.cpus_per_rank,
                    gpus_per_rank=self.gpus_per_rank, dtype="float32",
                    compile=self.compile, prefix_caching=self.prefix_caching)  # fmt: skip


@dataclass(frozen=True)
class GrpoConfig:
    """GRPO (Shao et al. 2024): `clip` is PPO's ratio clip, `kl_coef` weighs the KL to the
    frozen starting policy."""

    clip: float = 0.2
    kl_coef: float = 0.04

    def __post_init__(self) -> None:
        if not 0 < self.clip < 1:
            raise ConfigError("grpo.clip", f"must be in (0, 1), got {self.clip}")
        if self.kl_coef < 0:
            raise ConfigError("grpo.kl_coef", f"must be >= 0, got {self.kl_coef}")


@dataclass(frozen=True)
class RlhfJob:
    """Everything an online RLHF run needs (see the module docstring of upcycle.rlhf.loop)."""

    policy: str  # our LM checkpoint to start from; also the frozen reference
    prompts: str  # JSONL of {"prompt": text or messages, ...task fields for the verifier}
    objective: str = "online_dpo"  # online_dpo | grpo
    scorer: str = "exact"  # exact | execution (verifiers) or a reward model checkpoint
    sandbox: str = "bwrap"  # where `execution` runs programs: bwrap | process (no boundary)
    iterations: int = 10
    prompts_per_iteration: int = 8
    steps_per_iteration: int = 1  # optimizer steps on each iteration's rollouts
    save_interval: int = 0  # iterations between checkpoints; 0: only at the end
    rollout: RolloutConfig = RolloutConfig()
    layout: Layout = Layout()
    train: TrainConfig = TrainConfig(steps=10, warmup_steps=0, min_lr=0.0)
    dpo: DpoConfig = DpoConfig()
    grpo: GrpoConfig = GrpoConfig()
    name: str = "rlhf"
    experiment: str = "upcycle"
    tracking_uri: str = ""
    tracking_dir: str = ""
    tags: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("iterations", "prompts_per_iteration", "steps_per_iteration"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")
        if self.save_interval < 0:
            raise ConfigError("save_interval", f"must be >= 0, got {self.save_interval}")
        if self.objective not in OBJECTIVES:
            raise ConfigError("objective", f"{self.objective!r}; allowed: {OBJECTIVES}")
        if self.sandbox not in KINDS:
            raise ConfigError("sandbox", f"{self.sandbox!r}; allowed: {KINDS}")
        if self.dpo.reference:
            raise ConfigError("dpo.reference", "online DPO's reference is the starting policy")
        if self.train.steps != self.steps:  # one LR schedule over every step of the run
            object.__setattr__(self, "train", dataclasses.replace(self.train, steps=self.steps))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for name in _DERIVED:  # from_dict sets them again
            d["train"].pop(name)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RlhfJob:
        check_spec_fields(cls, d, "rlhf", required=("policy", "prompts"))
        d = dict(d)
        train = {"warmup_steps": 0, "min_lr": 0.0, **(d.pop("train", None) or {})}
        for name in _DERIVED:
            if name in train:
                raise ConfigError(
                    f"train.{name}",
                    "set by the RLHF job (iterations x steps_per_iteration, the prompts' length "
                    "+ rollout.max_tokens, save_interval); remove it from the train section",
                )
        steps = d.get("iterations", 10) * d.get("steps_per_iteration", 1)
        return cls(
            rollout=section_from_dict(RolloutConfig, d.pop("rollout", None) or {}, "rollout"),
            layout=Layout.from_dict(d.pop("layout", None) or {}),
            train=TrainConfig.from_dict({"steps": steps, **train}),
            dpo=DpoConfig.from_dict(d.pop("dpo", None) or {}),
            grpo=section_from_dict(GrpoConfig, d.pop("grpo", None) or {}, "grpo"),
            **d,
        )

    @property
    def steps(self) -> int:
        return self.iterations * self.steps_per_iteration

    def train_config(self, seq_length: int) -> TrainConfig:
        """The trainer's schedule: one LR schedule over every optimizer step of the run."""
        return dataclasses.replace(self.train, seq_length=seq_length)

    def trainer_layout(self, world_size: int) -> Layout:
        """The trainer's layout: micro-batches of prompts (GRPO: K rows each, online DPO: a
        chosen and a rejected row), one global batch = one iteration's prompts."""
        layout = dataclasses.replace(self.layout, global_batch_size=self.prompts_per_iteration)
        if self.layout.global_batch_size not in (0, self.prompts_per_iteration):
            raise ConfigError(
                "layout.global_batch_size",
                "set by prompts_per_iteration (an iteration's prompts are the trainer's batch); "
                "remove it",
            )
        if layout.vpp != 1:
            raise ConfigError(
                "layout.vpp", "the weight sync reads one model chunk per rank: use vpp 1"
            )
        try:
            return layout.resolve(world_size)
        except ConfigError as e:
            if e.field != "layout.global_batch_size":
                raise
            raise ConfigError(
                "prompts_per_iteration",
                f"{self.prompts_per_iteration} must be a multiple of layout.micro_batch_size x "
                f"data-parallel ranks ({layout.micro_batch_size} x "
                f"{world_size // (layout.tp * layout.pp)})",
            ) from None

    def validate(self, world_size: int) -> tuple[ModelConfig, Layout, list[dict]]:
        """Check the job for `world_size` trainer ranks before any actor starts: the policy's
        model config, the trainer's layout and the prompt records."""
        from upcycle.deploy.engine.runner import RunnerConfig
        from upcycle.platform.checkpoint import MODEL_CONFIG, read_model_config
        from upcycle.rlhf.prompts import read_tasks

        if not (Path(self.policy) / MODEL_CONFIG).is_file():
            raise ConfigError("policy", f"{self.policy} is not our checkpoint (no {MODEL_CONFIG})")
        cfg = read_model_config(Path(self.policy))
        if cfg.is_reward_model:
            raise ConfigError(
                "policy", f"{self.policy} is a reward model; RLHF trains a language model"
            )
        self._check_scorer()
        layout = self.trainer_layout(world_size)
        layout.check_model(cfg)
        tasks = read_tasks(Path(self.prompts), self, cfg)
        try:
            RunnerConfig(**self.rollout.runner(self.seq_length(tasks))).check(cfg)
        except ConfigError as e:
            field = e.field.replace("engine.", "rollout.")
            raise ConfigError(field, str(e).split(": ", 1)[1]) from None
        return cfg, layout, tasks

    def seq_length(self, tasks: list[dict]) -> int:
        """Tokens per trainer row and per engine sequence: the longest prompt + max_tokens."""
        return max(len(t["ids"]) for t in tasks) + self.rollout.max_tokens

    def _check_scorer(self) -> None:
        from upcycle.platform.checkpoint import MODEL_CONFIG, read_model_config

        if self.scorer == "execution":
            from upcycle.synthesis.sandbox import Sandbox, SandboxUnavailable

            try:
                Sandbox(kind=self.sandbox).require()
            except SandboxUnavailable as e:
                raise ConfigError("sandbox", str(e).removeprefix("sandbox: ")) from None
        if self.scorer in VERIFIER_SCORERS:
            return
        path = Path(self.scorer)
        if not (path / MODEL_CONFIG).is_file():
            raise ConfigError(
                "scorer",
                f"{self.scorer!r} is neither a verifier ({', '.join(VERIFIER_SCORERS)}) nor a "
                "reward model checkpoint (`upcycle reward train`'s output)",
            )
        if not read_model_config(path).is_reward_model:
            raise ConfigError(
                "scorer",
                f"{self.scorer} is a language model, not a reward model (head 'score'); train "
                "one with `upcycle reward train`",
            )

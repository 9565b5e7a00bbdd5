"""A training job: what it trains (model, objective, data), how (layout, schedule), from what
checkpoint and where it is tracked; plain data that travels to Ray workers as a dict, and checked
against a world size before any worker starts."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from upcycle import runtime
from upcycle.config import ConfigError, Layout, ModelConfig, check_spec_fields, from_name
from upcycle.train_config import DpoConfig, LongContext, SftConfig, TrainConfig
from upcycle.training.chat_data import PackedConversations, PreferencePairs
from upcycle.training.data import Samples, TokenDataset, TokenWindows

OBJECTIVES = ("pretrain", "sft", "dpo", "reward")  # upcycle.training.objectives
PAIRED = ("dpo", "reward")  # objectives that read preference pairs


@dataclass(frozen=True)
class TrainJob:
    """Everything a training run needs; plain data, so it travels to Ray workers as a dict."""

    model: ModelConfig
    data: str  # pretrain: a folder written by `upcycle data prepare`; sft, dpo, reward: JSONL
    layout: Layout = Layout()
    train: TrainConfig = TrainConfig()
    objective: str = "pretrain"  # pretrain | sft | dpo | reward (`model` gets a score head)
    sft: SftConfig = SftConfig()
    dpo: DpoConfig = DpoConfig()
    long_context: LongContext | None = None  # applied to `model` when the job is read
    init_from: str | None = None  # our checkpoint to start from (weights only; any layout)
    resume_from: str | None = None  # a training checkpoint to continue (weights, optimizer, step)
    name: str = "train"
    experiment: str = "upcycle"
    tracking_uri: str = ""
    tracking_dir: str = ""  # the run's MLflow spool (upcycle.platform.tracking)
    tags: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.objective == "reward" and not self.model.is_reward_model:
            # a reward job trains the named backbone with a score head (from_dict, or in code)
            object.__setattr__(self, "model", self.model.as_reward_model())

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["model"] = self.model.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainJob:
        check_spec_fields(cls, d, "job", required=("model", "data"))
        d = dict(d)
        model = d.pop("model")
        model = from_name(model) if isinstance(model, str) else ModelConfig.from_dict(model)
        layout = Layout.from_dict(d.pop("layout", None) or {})
        train = TrainConfig.from_dict(d.pop("train", None) or {})
        sft = SftConfig.from_dict(d.pop("sft", None) or {})
        dpo = DpoConfig.from_dict(d.pop("dpo", None) or {})
        long_context = d.pop("long_context", None)
        if long_context is not None:
            long_context = LongContext.from_dict(long_context)
            model = long_context.apply(model)
        return cls(
            model=model, layout=layout, train=train, sft=sft, dpo=dpo,
            long_context=long_context, **d,
        )  # fmt: skip

    def validate(self, world_size: int, *, on_this_machine: bool = True) -> Layout:
        """Check the job against a world size before any worker starts; the resolved layout.

        `on_this_machine=False` checks only what does not depend on this machine (a spec meant
        for a GPU cluster: no data folder here, no CUDA)."""
        if self.objective not in OBJECTIVES:
            raise ConfigError("objective", f"{self.objective!r}; allowed: {OBJECTIVES}")
        if self.objective == "dpo" and not (self.dpo.reference or self.init_from):
            raise ConfigError(
                "init_from",
                "DPO starts from a trained (SFT) checkpoint, which is also its frozen reference: "
                "set init_from (or dpo.reference)",
            )
        if self.model.is_reward_model and self.objective != "reward":
            raise ConfigError(
                "model.head",
                f"'score' (a reward model) trains only with objective reward, not "
                f"{self.objective!r}; start {self.objective} from a language model",
            )
        self._check_start_is_a_language_model()
        layout = self.layout.resolve(world_size)
        layout.check_model(self.model)
        if self.train.seq_length > self.model.max_position_embeddings:
            raise ConfigError(
                "train.seq_length",
                f"{self.train.seq_length} exceeds the model's max_position_embeddings "
                f"({self.model.max_position_embeddings})",
            )
        if self.train.warmup_steps >= self.train.steps:
            raise ConfigError(
                "train.warmup_steps",
                f"{self.train.warmup_steps} must be below train.steps ({self.train.steps})",
            )
        if not on_this_machine:
            return layout
        if self.train.fp8:
            runtime.require_te(f"train.fp8={self.train.fp8!r}")
        if self.train.dtype == "bf16" and not runtime.bf16_supported():
            raise ConfigError("train.dtype", f"{runtime.NO_BF16}: use fp32")
        if self.objective == "sft" and self.sft.pack and runtime.te_available():
            # TE's fused attention takes packed sequences as THD + cu_seqlens, not a mask
            raise ConfigError(
                "sft.pack",
                "packing keeps conversations apart with an attention mask, which Transformer "
                "Engine's attention does not read; set sft.pack: false (a row per conversation)",
            )
        if self.objective in PAIRED and Path(self.data).is_dir():
            raise ConfigError(
                "data",
                f"{self.data} is a folder; objective {self.objective} trains on preference "
                'pairs: a JSONL file of {"prompt", "chosen", "rejected"} (`upcycle data '
                "chat-demo`'s dpo.jsonl, or `upcycle synthesize rejection`'s)",
            )
        self.samples()  # the data exists, verifies and parses
        return layout

    def samples(self) -> Samples:
        """What this job reads: token windows, packed conversations or preference pairs."""
        t = self.train
        if self.objective == "sft":
            return PackedConversations(Path(self.data), t.seq_length, t.seed, pack=self.sft.pack)
        if self.objective in PAIRED:
            return PreferencePairs(Path(self.data), t.seq_length)
        return TokenWindows(TokenDataset(Path(self.data)), t.seq_length)

    def _check_start_is_a_language_model(self) -> None:
        """A reward checkpoint has no LM head: only another reward job may start from it."""
        from upcycle.platform.checkpoint import MODEL_CONFIG, read_model_config

        if self.objective == "reward":
            return
        starts = {"init_from": self.init_from, "resume_from": self.resume_from}
        if self.objective == "dpo":
            starts["dpo.reference"] = self.reference
        for name, path in starts.items():
            if path and (Path(path) / MODEL_CONFIG).is_file():
                if read_model_config(Path(path)).is_reward_model:
                    raise ConfigError(
                        name,
                        f"{path} is a reward model (head 'score'); {self.objective} starts from "
                        "a language model checkpoint (score text with `upcycle reward score`)",
                    )

    @property
    def reference(self) -> str | None:
        """DPO's frozen reference checkpoint."""
        return self.dpo.reference or self.init_from

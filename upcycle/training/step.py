"""The per-rank pieces of training: model chunks, optimizer, and `RankTrainer`, which holds
them with the LR schedule, starts (resume or init) and saves them (the forward steps are in
upcycle.training.objectives).

Kept apart from the job loop (`upcycle.training.loop`) so that benchmarks and the GPU check
build exactly what training runs (no Ray, no MLflow), and so that the RLHF loop
(upcycle.rlhf.loop) drives the same trainer as supervised jobs do.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from megatron.core import parallel_state
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from upcycle import runtime
from upcycle.config import ConfigError, Layout, ModelConfig
from upcycle.dense.megatron_config import to_transformer_config
from upcycle.moe import aux_loss
from upcycle.moe.model import build_model
from upcycle.platform.checkpoint import (
    load_checkpoint,
    load_training_state,
    newest_valid,
    save_training_state,
)
from upcycle.platform.distributed import init_parallel_state
from upcycle.train_config import TrainConfig


class Sink(Protocol):
    """Where checkpoints go and where a resumed run finds them."""

    def resume_from(self) -> Path | None: ...

    def save(self, step: int, metrics: dict, write: Callable[[Path], None]) -> None: ...


def param_dtype(train: TrainConfig) -> torch.dtype:
    """bf16 where asked for, and for `auto` on a GPU; `auto` stays fp32 on a CPU (bf16 there is
    opt-in: fast only with AMX, and the tiny demo models train in seconds either way)."""
    if train.dtype == "bf16" or (train.dtype == "auto" and runtime.has_cuda()):
        return torch.bfloat16
    return torch.float32


def build_chunks(
    model_cfg: ModelConfig, layout: Layout, tconfig, *, trainable: bool = True
) -> list[torch.nn.Module]:
    """This rank's model chunks (one per virtual pipeline stage), each wrapped in megatron DDP;
    `trainable=False`: plain frozen modules (DPO's reference model)."""
    vpp = layout.vpp if layout.vpp > 1 else None
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=runtime.has_cuda(),  # it asserts CUDA tensors
    )
    chunks = []
    for vp in range(vpp or 1):
        stage = vp if vpp else None
        model = build_model(
            model_cfg,
            tconfig,
            pre_process=parallel_state.is_pipeline_first_stage(
                ignore_virtual=not vpp, vp_stage=stage
            ),
            post_process=parallel_state.is_pipeline_last_stage(
                ignore_virtual=not vpp, vp_stage=stage
            ),
            vp_stage=stage,
        )
        model.to(runtime.device())
        if not trainable:
            chunks.append(model.eval().requires_grad_(False))
            continue
        chunks.append(
            DistributedDataParallel(
                config=tconfig, ddp_config=ddp_config, module=model, disable_bucketing=vp > 0
            )
        )
    return chunks


def build_optimizer(chunks: list[torch.nn.Module], t: TrainConfig, tconfig):
    """megatron-core's Adam over the chunks (the distributed optimizer where CUDA is; with bf16
    params its mixed-precision wrapper keeps fp32 main params, grads and Adam state)."""
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=t.lr,
            min_lr=t.min_lr,
            weight_decay=t.weight_decay,
            adam_beta1=t.adam_beta1,
            adam_beta2=t.adam_beta2,
            adam_eps=t.adam_eps,
            clip_grad=t.clip_grad,
            bf16=tconfig.bf16,
            params_dtype=tconfig.params_dtype,
            use_distributed_optimizer=runtime.has_cuda(),
        ),
        chunks,
    )
    _fuse_torch_adam(optimizer)
    return optimizer


def _fuse_torch_adam(optimizer) -> None:
    """Without Transformer Engine or Apex, megatron-core falls back to `torch.optim.AdamW` with
    torch's default implementation, which on CPU is a Python loop over parameters; torch's fused
    AdamW kernel (CPU and CUDA) does the same update in one call per group: 0.20 -> 0.10 s per
    moe-bench step here. OptimizerConfig has no switch for it, so it is set on the groups."""
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        torch_adam = getattr(inner, "optimizer", None)
        if type(torch_adam) is torch.optim.AdamW:
            for group in torch_adam.param_groups:
                group["fused"], group["foreach"] = True, False


@dataclass
class RankTrainer:
    """A rank's trainable model: its layout, model chunks (megatron DDP), optimizer and LR
    schedule. The supervised loop (upcycle.training.loop) and the RLHF loop
    (upcycle.rlhf.loop) both drive one."""

    layout: Layout
    tconfig: object  # megatron-core TransformerConfig
    chunks: list
    optimizer: object
    scheduler: OptimizerParamScheduler

    @classmethod
    def build(cls, cfg: ModelConfig, layout: Layout, t: TrainConfig) -> RankTrainer:
        """Parallel state from `layout`, then the chunks, Adam and warmup + cosine LR."""
        torch.set_num_threads(t.threads_per_worker)
        layout = init_parallel_state(layout, seed=t.seed)
        layout.check_model(cfg)
        tconfig = to_transformer_config(
            cfg,
            layout,
            params_dtype=param_dtype(t),
            fp8=t.fp8,
            fp8_recipe=t.fp8_recipe,
            token_dispatcher=t.token_dispatcher,
        )
        tconfig.finalize_model_grads_func = finalize_model_grads
        aux_loss.reset()
        chunks = build_chunks(cfg, layout, tconfig)
        optimizer = build_optimizer(chunks, t, tconfig)
        scheduler = OptimizerParamScheduler(
            optimizer,
            init_lr=0.0,
            max_lr=t.lr,
            min_lr=t.min_lr,
            lr_warmup_steps=t.warmup_steps,
            lr_decay_steps=t.steps,
            lr_decay_style="cosine",
            start_wd=t.weight_decay,
            end_wd=t.weight_decay,
            wd_incr_steps=t.steps,
            wd_incr_style="constant",
        )
        return cls(layout, tconfig, chunks, optimizer, scheduler)

    def start(self, sink: Sink, *, resume_from: str | None, init_from: str | None) -> int:
        """Load where this run starts; the step it starts at. The run's own newest checkpoint
        first, then `resume_from` (weights, optimizer, step), then `init_from` (weights)."""
        resume = sink.resume_from()
        if resume is None and resume_from:
            resume = newest_valid([Path(resume_from)])
            if resume is None:
                raise ConfigError(
                    "resume_from", f"{resume_from} is not a valid training checkpoint"
                )
        if resume is not None:
            state = load_training_state(resume, chunks=self.chunks, optimizer=self.optimizer)
            self.scheduler.load_state_dict(state["scheduler"])
            return state["step"]
        if init_from:
            load_checkpoint(self.chunks, Path(init_from))
        return 0

    def frozen_copy(self, cfg: ModelConfig, ckpt: str) -> list:
        """Frozen chunks of `ckpt` under this layout (a reference model)."""
        chunks = build_chunks(cfg, self.layout, self.tconfig, trainable=False)
        load_checkpoint(chunks, Path(ckpt))
        aux_loss.reset()
        return chunks

    def zero_grad(self) -> None:
        for chunk in self.chunks:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()

    def step(self) -> dict[str, float]:
        """The optimizer and LR step after a forward-backward: grad norm and the LR it used."""
        _ok, grad_norm, _zeros = self.optimizer.step()
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step(increment=1)
        return {"grad_norm": float("nan") if grad_norm is None else float(grad_norm), "lr": lr}

    def save(self, sink: Sink, step: int, cfg: ModelConfig, name: str, metrics: dict) -> None:
        """A training checkpoint (weights, optimizer, schedule) of `step` through `sink`."""
        train_state = {
            "step": step,
            "scheduler": self.scheduler.state_dict(),
            "layout": dataclasses.asdict(self.layout),
            "job": name,
        }

        def write(folder: Path) -> None:
            save_training_state(folder, chunks=self.chunks, optimizer=self.optimizer, cfg=cfg,
                                train_state=train_state)  # fmt: skip

        sink.save(step, metrics, write)

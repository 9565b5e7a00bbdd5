"""The per-rank pieces of a training step: model chunks and optimizer (the forward steps are in
upcycle.platform.objectives).

Kept apart from the job loop (`upcycle.platform.training`) so that benchmarks and the GPU check
build exactly what training runs, with only torch and megatron-core imported.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

from upcycle import runtime
from upcycle.config import Layout, ModelConfig
from upcycle.moe.model import build_model
from upcycle.train_config import TrainConfig


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

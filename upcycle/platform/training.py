"""The training loop every rank runs: megatron-core model chunks, DDP, optimizer and schedule.

`train(job, sink)` is the same code in a Ray Train worker (`upcycle.platform.ray_train`, where the
sink reports checkpoints to Ray) and in one plain process (`LocalSink`, for single-process
reference runs and debugging). Per step: megatron-core's forward-backward schedule (1F1B, or
interleaved when vpp > 1) over this rank's micro-batches, gradient reduction and clipping, an
optimizer step, warmup + cosine LR; metrics are reduced to every rank and rank 0 logs them.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import finalize_model_grads
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func

from upcycle import runtime
from upcycle.atomic import atomic_directory
from upcycle.config import ConfigError, Layout, ModelConfig, TrainConfig, from_name
from upcycle.dense.megatron_config import to_transformer_config
from upcycle.moe import aux_loss
from upcycle.platform.checkpoint import (
    LINEAGE,
    load_checkpoint,
    load_training_state,
    newest_valid,
    save_training_state,
)
from upcycle.platform.data import StepBatches, TokenDataset
from upcycle.platform.distributed import init_parallel_state
from upcycle.platform.metrics import ExpertLoad, peak_flops, train_flops_per_token
from upcycle.platform.plots import expert_load_heatmap
from upcycle.platform.step import build_chunks, build_optimizer, forward_step, param_dtype
from upcycle.platform.tracking import RunTracker


@dataclass(frozen=True)
class TrainJob:
    """Everything a training run needs; plain data, so it travels to Ray workers as a dict."""

    model: ModelConfig
    data: str  # a folder written by `upcycle data prepare`
    layout: Layout = Layout()
    train: TrainConfig = TrainConfig()
    init_from: str | None = None  # our checkpoint to start from (weights only; any layout)
    resume_from: str | None = None  # a training checkpoint to continue (weights, optimizer, step)
    name: str = "train"
    experiment: str = "upcycle"
    tracking_uri: str = ""
    tracking_dir: str = ""  # the run's MLflow spool (upcycle.platform.tracking)
    tags: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["model"] = self.model.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainJob:
        if not isinstance(d, dict):
            raise ConfigError("job", f"must be a mapping, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(unknown[0], f"unknown field; valid fields: {sorted(names)}")
        for required in ("model", "data"):
            if required not in d:
                raise ConfigError(required, "missing; it has no default")
        d = dict(d)
        model = d.pop("model")
        model = from_name(model) if isinstance(model, str) else ModelConfig.from_dict(model)
        layout = Layout.from_dict(d.pop("layout", None) or {})
        train = TrainConfig.from_dict(d.pop("train", None) or {})
        return cls(model=model, layout=layout, train=train, **d)

    def validate(self, world_size: int, *, on_this_machine: bool = True) -> Layout:
        """Check the job against a world size before any worker starts; the resolved layout.

        `on_this_machine=False` checks only what does not depend on this machine (a spec meant
        for a GPU cluster: no data folder here, no CUDA)."""
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
        if self.train.dtype == "bf16" and not runtime.has_cuda():
            raise ConfigError("train.dtype", "bf16 training needs a CUDA device; use fp32 or auto")
        TokenDataset(Path(self.data))  # exists and verifies
        return layout


class Sink(Protocol):
    """Where checkpoints go and where a resumed run finds them."""

    def resume_from(self) -> Path | None: ...

    def save(self, step: int, metrics: dict, write: Callable[[Path], None]) -> None: ...


class LocalSink:
    """Checkpoints under `out/checkpoints/step_NNNNNNN` in one process (no Ray)."""

    def __init__(self, out: Path):
        self.root = Path(out) / "checkpoints"

    def resume_from(self) -> Path | None:
        return newest_valid(sorted(self.root.glob("step_*[0-9]")), set_aside=True)

    def save(self, step: int, metrics: dict, write: Callable[[Path], None]) -> None:
        with atomic_directory(self.root / f"step_{step:07d}") as tmp:
            write(tmp)


class _RunLog:
    """Rank 0's MLflow run for this job (other ranks: nothing)."""

    def __init__(self, job: TrainJob, layout: Layout, dataset: TokenDataset):
        self.tracker = None
        if dist.get_rank() != 0 or not job.tracking_dir:
            return
        self.tracker = RunTracker(
            Path(job.tracking_dir),
            tracking_uri=job.tracking_uri,
            experiment=job.experiment,
            run_name=job.name,
        )
        self.tracker.log_params(
            {
                "model": job.model.name,
                "model_config": json.dumps(job.model.to_dict()),
                **{f"layout.{k}": v for k, v in dataclasses.asdict(layout).items()},
                **{f"train.{k}": v for k, v in job.train.to_dict().items()},
                "data": job.data,
                "data.num_tokens": dataset.num_tokens,
                "data.manifest_sha256": dataset.manifest_sha256,
                "data.shards": len(dataset.meta["shards"]),
                "init_from": job.init_from or "",
            }
        )
        self.tracker.set_tags({**job.tags, **_lineage_tags(job.init_from)})
        with tempfile.TemporaryDirectory() as tmp:
            spec = Path(tmp) / "job.json"
            spec.write_text(json.dumps(job.to_dict(), indent=1))
            self.tracker.log_artifact(spec)

    def metrics(self, step: int, steps: int, values: dict[str, float]) -> None:
        if self.tracker:
            self.tracker.log_metrics(step, values)
            aux = f" aux {values['aux_loss']:.4f}" if "aux_loss" in values else ""
            print(
                f"step {step}/{steps} loss {values['loss']:.4f}{aux} grad norm "
                f"{values['grad_norm']:.3f} lr {values['lr']:.2e} "
                f"{values['tokens_per_s']:,.0f} tok/s",
                flush=True,
            )

    def finish(self, cfg: ModelConfig, expert_tokens: torch.Tensor) -> None:
        if not self.tracker:
            return
        if cfg.is_moe:
            with tempfile.TemporaryDirectory() as tmp:
                png = expert_load_heatmap(expert_tokens, Path(tmp) / "expert_load.png")
                self.tracker.log_artifact(png)
        self.tracker.close()


def _lineage_tags(init_from: str | None) -> dict[str, str]:
    """`upcycled.*` tags when the starting checkpoint was upcycled (its lineage.json)."""
    path = Path(init_from or "") / LINEAGE
    if not init_from or not path.is_file():
        return {}
    lineage = json.loads(path.read_text())
    settings = {f"upcycled.{k}": v for k, v in lineage.pop("settings", {}).items()}
    return {**{f"upcycled.{k}": v for k, v in lineage.items()}, **settings}


def _reduce_step_metrics(job: TrainJob, losses: list[dict], num_microbatches: int) -> dict:
    """lm loss (mean over micro-batches and data-parallel ranks) and per-layer aux loss."""
    cfg = job.model
    device = runtime.device()  # NCCL reduces device tensors only
    lm = torch.zeros(2, dtype=torch.float64, device=device)
    for d in losses:  # only the last pipeline stage has losses
        lm += torch.tensor([float(d["lm loss"]), 1.0], dtype=torch.float64, device=device)
    dist.all_reduce(lm)
    out = {"lm_loss": float(lm[0] / lm[1])}
    if cfg.is_moe:
        # Each layer's value lives on its stage; sequence-parallel ranks hold partial sums.
        per_layer = aux_loss.layer_aux_losses(cfg).to(device, torch.float64)
        aux_loss.reset()
        dist.all_reduce(per_layer)
        dp = parallel_state.get_data_parallel_world_size()
        per_layer /= dp * num_microbatches
        out["aux_loss"] = float(per_layer.mean())
        out["loss"] = out["lm_loss"] + cfg.router_aux_loss_coef * out["aux_loss"]
    else:
        out["loss"] = out["lm_loss"]
    return out


def train(job: TrainJob, sink: Sink) -> dict[str, float]:
    """Run (or resume) `job` on this rank; returns the last step's metrics."""
    torch.set_num_threads(job.train.threads_per_worker)
    t = job.train
    layout = init_parallel_state(job.layout, seed=t.seed)
    layout.check_model(job.model)
    tconfig = to_transformer_config(
        job.model,
        layout,
        params_dtype=param_dtype(t),
        fp8=t.fp8,
        fp8_recipe=t.fp8_recipe,
        token_dispatcher=t.token_dispatcher,
    )
    tconfig.finalize_model_grads_func = finalize_model_grads
    aux_loss.reset()
    chunks = build_chunks(job.model, layout, tconfig)
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
    start = 0
    resume = sink.resume_from()  # the job's own newest checkpoint first
    if resume is None and job.resume_from:
        resume = newest_valid([Path(job.resume_from)])
        if resume is None:
            raise ConfigError(
                "resume_from", f"{job.resume_from} is not a valid training checkpoint"
            )
    if resume is not None:
        state = load_training_state(resume, chunks=chunks, optimizer=optimizer)
        start = state["step"]
        scheduler.load_state_dict(state["scheduler"])
    elif job.init_from:
        load_checkpoint(chunks, Path(job.init_from))

    dataset = TokenDataset(Path(job.data))
    batches = StepBatches(
        dataset,
        seq_length=t.seq_length,
        micro_batch_size=layout.micro_batch_size,
        global_batch_size=layout.global_batch_size,
        dp_rank=parallel_state.get_data_parallel_rank(),
        dp_size=parallel_state.get_data_parallel_world_size(),
        seed=t.seed,
    )
    n_micro = batches.num_microbatches
    run_log = _RunLog(job, layout, dataset)
    expert_load = ExpertLoad(job.model, chunks, layout.sequence_parallel)
    expert_tokens = torch.zeros_like(expert_load.counts, device="cpu")
    flops_per_step = (
        train_flops_per_token(job.model, t.seq_length) * layout.global_batch_size * t.seq_length
    )
    peak = (t.peak_flops or peak_flops()) * dist.get_world_size()
    forward_backward = get_forward_backward_func()
    end = min(t.steps, t.stop_at_step or t.steps)
    metrics: dict[str, float] = {}

    for step in range(start, end):
        began = time.perf_counter()
        for chunk in chunks:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        micro = batches.step(step)
        losses = forward_backward(
            forward_step_func=forward_step,
            data_iterator=[iter(micro) for _ in chunks] if len(chunks) > 1 else iter(micro),
            model=chunks,
            num_microbatches=n_micro,
            seq_length=t.seq_length,
            micro_batch_size=layout.micro_batch_size,
            forward_only=False,
        )
        _ok, grad_norm, _zeros = optimizer.step()
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step(increment=1)
        metrics = _reduce_step_metrics(job, losses, n_micro)
        elapsed = time.perf_counter() - began
        metrics.update(
            grad_norm=float("nan") if grad_norm is None else float(grad_norm),  # clip_grad=0
            lr=lr,
            tokens_per_s=layout.global_batch_size * t.seq_length / elapsed,
            step_time_s=elapsed,
            mfu=flops_per_step / elapsed / peak if peak else 0.0,
        )
        if job.model.is_moe:
            counts = expert_load.collect()
            expert_tokens += counts
            for layer, cv in enumerate(ExpertLoad.coefficient_of_variation(counts).tolist()):
                metrics[f"expert_cv/layer_{layer}"] = cv
                for e, n in enumerate(counts[layer].tolist()):
                    metrics[f"expert_tokens/layer_{layer}/expert_{e}"] = n
        run_log.metrics(step + 1, t.steps, metrics)
        done = step + 1
        if done == end or (t.save_interval and done % t.save_interval == 0):
            train_state = {
                "step": done,
                "scheduler": scheduler.state_dict(),
                "layout": dataclasses.asdict(layout),
                "job": job.name,
            }

            def write(folder: Path, train_state=train_state) -> None:
                save_training_state(
                    folder,
                    chunks=chunks,
                    optimizer=optimizer,
                    cfg=job.model,
                    train_state=train_state,
                )

            sink.save(done, {"step": done, **_headline(metrics)}, write)
    run_log.finish(job.model, expert_tokens)
    return metrics


def _headline(metrics: dict[str, float]) -> dict[str, float]:
    keys = ("loss", "lm_loss", "aux_loss", "grad_norm", "lr", "tokens_per_s")
    return {k: metrics[k] for k in keys if k in metrics}

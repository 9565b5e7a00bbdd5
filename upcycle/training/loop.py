"""The training loop every rank runs: megatron-core model chunks, DDP, optimizer and schedule.

One loop for every objective (upcycle.training.objectives): pretraining on token shards, SFT on
packed ChatML conversations, DPO on preference pairs against a frozen reference model, and a
reward model (score head) on the same pairs.

`train(job, sink)` (a `upcycle.training.job.TrainJob`) is the same code in a Ray Train worker
(`upcycle.training.ray_train`, where the sink reports checkpoints to Ray) and in one plain process
(`LocalSink`, for single-process reference runs and debugging). Per step: megatron-core's forward-backward schedule (1F1B, or
interleaved when vpp > 1) over this rank's micro-batches, gradient reduction and clipping, an
optimizer step, warmup + cosine LR; metrics are reduced to every rank and rank 0 logs them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from upcycle import runtime
from upcycle.atomic import atomic_directory
from upcycle.config import Layout, ModelConfig
from upcycle.moe import aux_loss
from upcycle.platform.checkpoint import LINEAGE, newest_valid
from upcycle.platform.flops import peak_flops, train_flops_per_token
from upcycle.platform.tracking import RunTracker
from upcycle.training.chat_data import PackedConversations
from upcycle.training.data import Samples, StepBatches, TokenWindows
from upcycle.training.job import PAIRED, TrainJob
from upcycle.training.metrics import ExpertLoad, ExpertLoadArtifacts, expert_load_metrics
from upcycle.training.objectives import Dpo, lm_step, reward_step
from upcycle.training.step import RankTrainer, Sink


class LocalSink:
    """Checkpoints under `out/checkpoints/step_NNNNNNN` in one process (no Ray); after each save
    only the newest `keep` stay (0: all), as Ray Train's `CheckpointConfig.num_to_keep` does."""

    def __init__(self, out: Path, keep: int = 0):
        self.root = Path(out) / "checkpoints"
        self.keep = keep

    def resume_from(self) -> Path | None:
        return newest_valid(sorted(self.root.glob("step_*[0-9]")), set_aside=True)

    def save(self, step: int, metrics: dict, write: Callable[[Path], None]) -> None:
        with atomic_directory(self.root / f"step_{step:07d}") as tmp:
            write(tmp)
        if self.keep:
            for old in sorted(self.root.glob("step_*[0-9]"))[: -self.keep]:
                shutil.rmtree(old)


def _data_params(samples: Samples) -> dict:
    if isinstance(samples, TokenWindows):
        d = samples.dataset
        return {
            "data.num_tokens": d.num_tokens,
            "data.manifest_sha256": d.manifest_sha256,
            "data.shards": len(d.meta["shards"]),
        }
    params = {
        "data.sha256": hashlib.sha256(samples.path.read_bytes()).hexdigest(),
        "data.truncated": samples.truncated,  # examples cut to train.seq_length
    }
    if isinstance(samples, PackedConversations):
        return params | {"data.conversations": samples.num_examples, "data.rows": len(samples)}
    return params | {"data.pairs": len(samples)}


class _RunLog:
    """Rank 0's MLflow run for this job (other ranks: nothing)."""

    def __init__(self, job: TrainJob, layout: Layout, samples: Samples):
        self.tracker = None
        self.log_interval = job.train.log_interval or max(1, -(-job.train.steps // 10))
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
                **_data_params(samples),
                "init_from": job.init_from or "",
                "objective": job.objective,
                **({"sft.pack": job.sft.pack} if job.objective == "sft" else {}),
                **(
                    {"dpo.beta": job.dpo.beta, "dpo.reference": job.reference}
                    if job.objective == "dpo"
                    else {}
                ),
                **{
                    f"long_context.{k}": v
                    for k, v in (
                        dataclasses.asdict(job.long_context) if job.long_context else {}
                    ).items()
                },
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
            if step not in (1, steps) and step % self.log_interval:
                return
            aux = f" aux {values['aux_loss']:.4f}" if "aux_loss" in values else ""
            if "rewards/margin" in values:
                aux += (
                    f" margin {values['rewards/margin']:.4f} "
                    f"accuracy {values['rewards/accuracy']:.2f}"
                )
            print(
                f"step {step}/{steps} loss {values['loss']:.4f}{aux} grad norm "
                f"{values['grad_norm']:.3f} lr {values['lr']:.2e} "
                f"{values['tokens_per_s']:,.0f} tok/s",
                flush=True,
            )

    def finish(self) -> None:
        if self.tracker:
            self.tracker.close()


def _lineage_tags(init_from: str | None) -> dict[str, str]:
    """`upcycled.*` tags when the starting checkpoint was upcycled (its lineage.json)."""
    path = Path(init_from or "") / LINEAGE
    if not init_from or not path.is_file():
        return {}
    lineage = json.loads(path.read_text())
    settings = {f"upcycled.{k}": v for k, v in lineage.pop("settings", {}).items()}
    return {**{f"upcycled.{k}": v for k, v in lineage.items()}, **settings}


def reduce_step_metrics(
    cfg: ModelConfig, keys: list[str], losses: list[dict], num_microbatches: int
) -> dict:
    """The objective's metrics (mean over micro-batches and data-parallel ranks), per-layer aux
    loss, and `loss`: the objective plus the weighted aux loss."""
    device = runtime.device()  # NCCL reduces device tensors only
    sums = torch.zeros(len(keys) + 1, dtype=torch.float64, device=device)
    for d in losses:  # only the last pipeline stage has losses
        row = [*(float(d[k]) for k in keys), 1.0]
        sums += torch.tensor(row, dtype=torch.float64, device=device)
    dist.all_reduce(sums)
    out = dict(zip(keys, (sums[:-1] / sums[-1]).tolist(), strict=True))
    objective = out.pop("objective")
    if cfg.is_moe:
        # Each layer's value lives on its stage; sequence-parallel ranks hold partial sums.
        per_layer = aux_loss.layer_aux_losses(cfg).to(device, torch.float64)
        aux_loss.reset()
        dist.all_reduce(per_layer)
        dp = parallel_state.get_data_parallel_world_size()
        per_layer /= dp * num_microbatches
        out["aux_loss"] = float(per_layer.mean())
        out["loss"] = objective + cfg.router_aux_loss_coef * out["aux_loss"]
    else:
        out["loss"] = objective
    return out


def train(job: TrainJob, sink: Sink) -> dict[str, float]:
    """Run (or resume) `job` on this rank; returns the last step's metrics."""
    t = job.train
    trainer = RankTrainer.build(job.model, job.layout, t)
    layout, chunks = trainer.layout, trainer.chunks
    start = trainer.start(sink, resume_from=job.resume_from, init_from=job.init_from)
    dpo = ref_chunks = None
    if job.objective == "dpo":
        dpo = Dpo(job.dpo.beta)
        ref_chunks = trainer.frozen_copy(job.model, job.reference)

    samples = job.samples()
    batches = StepBatches(
        samples,
        micro_batch_size=layout.micro_batch_size,
        global_batch_size=layout.global_batch_size,
        dp_rank=parallel_state.get_data_parallel_rank(),
        dp_size=parallel_state.get_data_parallel_world_size(),
        seed=t.seed,
    )
    n_micro = batches.num_microbatches
    rows_per_pair = 2 if job.objective in PAIRED else 1  # preference pairs: chosen + rejected rows
    rows_per_micro = layout.micro_batch_size * rows_per_pair
    keys = _metric_keys(job)
    schedule = dict(
        num_microbatches=n_micro, seq_length=t.seq_length, micro_batch_size=rows_per_micro
    )
    run_log = _RunLog(job, layout, samples)
    expert_load = ExpertLoad(job.model, chunks, layout.sequence_parallel)
    expert_artifacts = ExpertLoadArtifacts(
        run_log.tracker, t.expert_load_interval, tuple(expert_load.counts.shape)
    )
    flops_per_step = (
        train_flops_per_token(job.model, t.seq_length) * layout.global_batch_size * t.seq_length
    )
    peak = (t.peak_flops or peak_flops()) * dist.get_world_size()
    forward_backward = get_forward_backward_func()
    end = min(t.steps, t.stop_at_step or t.steps)
    metrics: dict[str, float] = {}

    for step in range(start, end):
        began = time.perf_counter()
        trainer.zero_grad()
        micro = batches.step(step)
        if dpo:
            dpo.reference(forward_backward, ref_chunks, micro, **schedule)
            aux_loss.reset()  # the reference's router losses are not the policy's
        losses = forward_backward(
            forward_step_func=_step_func(job, dpo),
            data_iterator=[iter(micro) for _ in chunks] if len(chunks) > 1 else iter(micro),
            model=chunks,
            forward_only=False,
            **schedule,
        )
        stepped = trainer.step()
        metrics = reduce_step_metrics(job.model, keys, losses, n_micro)
        elapsed = time.perf_counter() - began
        metrics.update(
            **stepped,
            tokens_per_s=layout.global_batch_size * t.seq_length / elapsed * rows_per_pair,
            step_time_s=elapsed,
            mfu=flops_per_step / elapsed / peak if peak else 0.0,
        )
        if job.model.is_moe:
            counts = expert_load.collect()
            metrics.update(expert_load_metrics(counts))
            expert_artifacts.add(step + 1, counts)
        run_log.metrics(step + 1, t.steps, metrics)
        done = step + 1
        if done == end or (t.save_interval and done % t.save_interval == 0):
            trainer.save(sink, done, job.model, job.name, {"step": done, **_headline(metrics)})
    if job.model.is_moe:
        expert_artifacts.finish()
    run_log.finish()
    return metrics


def _step_func(job: TrainJob, dpo: Dpo | None):
    if dpo:
        return dpo.policy_step
    return reward_step if job.objective == "reward" else lm_step


_PAIR_METRICS = ["rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy"]


def _metric_keys(job: TrainJob) -> list[str]:
    """The keys of the objective's loss-function dicts (upcycle.training.objectives)."""
    if job.objective == "dpo":
        return ["objective", "dpo_loss", *_PAIR_METRICS]
    if job.objective == "reward":
        return ["objective", "reward_loss", *_PAIR_METRICS, "rewards/mean", "rewards/std"]
    return ["objective", "lm_loss"]


def _headline(metrics: dict[str, float]) -> dict[str, float]:
    keys = ("loss", "lm_loss", "dpo_loss", "reward_loss", "rewards/accuracy", "aux_loss",
            "grad_norm", "lr", "tokens_per_s")  # fmt: skip
    return {k: metrics[k] for k in keys if k in metrics}

"""The online RLHF loop every trainer rank runs (in a Ray Train worker, or one local process).

Each iteration:
1. Rollouts (rank 0 coordinates): the iteration's prompts are split over the rollout engines
   (upcycle.rlhf.rollout), which sample K responses each with the policy version they hold;
   a batch from any other version than the trainer's current one is discarded, the weights are
   sent again and the rollouts retried (an engine that died and restarted holds version 0).
2. Scores: a verifier or the reward model actor (upcycle.rlhf.scorers) scores every response.
3. Training: rank 0 broadcasts the scored groups; every rank builds its data-parallel share of
   micro-batches (upcycle.rlhf.batches), runs the frozen reference (and, when an iteration
   takes several steps, GRPO's old policy) forward-only, then `steps_per_iteration` optimizer
   steps of online DPO or GRPO (upcycle.rlhf.objectives) through megatron-core's schedule.
4. Weight sync: every rank gathers its tensors and the engines load them (upcycle.rlhf.sync):
   policy version i + 1. The first engine then computes the logits of a few fixed prompts and
   the trainer compares them with its own (`sync/max_logit_diff`: 0 up to float rounding).
Checkpoints (weights, optimizer, schedule) every `save_interval` iterations and at the end; a
restarted run resumes at the iteration after its newest checkpoint and first syncs the engines.
Metrics per iteration go to MLflow from rank 0; the scored rollouts, each with the policy
version that sampled it, go to `rollouts.jsonl` in the run's folder.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

from upcycle import runtime
from upcycle.moe import aux_loss
from upcycle.platform.checkpoint import read_model_config
from upcycle.platform.tracking import RunTracker
from upcycle.rlhf.batches import PAD, micro_batches
from upcycle.rlhf.objectives import Grpo, OnlineDpo
from upcycle.rlhf.prompts import iteration_prompts, read_tasks
from upcycle.rlhf.spec import RlhfJob
from upcycle.rlhf.sync import gather_full, nbytes
from upcycle.training.loop import reduce_step_metrics
from upcycle.training.objectives import data_iterators
from upcycle.training.step import RankTrainer, Sink

PROBES = 4  # prompts whose logits are compared after every sync
MAX_RESYNCS = 3  # per iteration: an engine restarted mid-iteration needs one

KEYS = {
    "online_dpo": ["objective", "dpo_loss", "rewards/margin", "rewards/accuracy", "pairs_used",
                   "kl"],
    "grpo": ["objective", "grpo_loss", "kl", "clip_fraction"],
}  # fmt: skip


class Coordinator:
    """Rank 0's side of an iteration: rollouts from the engines and their scores."""

    def __init__(self, job: RlhfJob, tasks: list[dict], engines: list, scorer):
        self.job, self.tasks, self.engines, self.scorer = job, tasks, engines, scorer
        self.resyncs = 0

    def rollouts(self, iteration: int, version: int) -> dict | None:
        """The iteration's scored groups, or None when an engine holds another version."""
        import ray

        job = self.job
        chosen = iteration_prompts(
            len(self.tasks), job.prompts_per_iteration, iteration, job.train.seed
        )
        spec = dict(samples=job.rollout.samples, temperature=job.rollout.temperature,
                    top_p=job.rollout.top_p, max_tokens=job.rollout.max_tokens,
                    seed=(job.train.seed + iteration) % 2**24)  # fmt: skip
        began = time.perf_counter()
        n = len(self.engines)
        calls = [
            e.generate.remote([[p, self.tasks[i]["ids"]] for p, i in enumerate(chosen)][j::n], spec)
            for j, e in enumerate(self.engines)
        ]
        results = ray.get(calls)
        rollout_s = time.perf_counter() - began
        if any(r["version"] != version for r in results):
            self.resyncs += 1
            return None
        samples = {int(p): s for r in results for p, s in r["samples"].items()}
        ordered = [samples[p] for p in range(len(chosen))]
        began = time.perf_counter()
        scores = self.scorer([self.tasks[i] for i in chosen], ordered)
        score_s = time.perf_counter() - began
        tokens = sum(r["tokens"] for r in results)
        groups = [
            {"index": i, "ids": self.tasks[i]["ids"], "responses": [s["tokens"] for s in group],
             "texts": [s["text"] for s in group], "scores": [float(x) for x in sc]}
            for i, group, sc in zip(chosen, ordered, scores, strict=True)
        ]  # fmt: skip
        flat = torch.tensor([x for g in groups for x in g["scores"]], dtype=torch.float64)
        return {
            "version": version,
            "groups": groups,
            "metrics": {
                "reward/mean": float(flat.mean()),
                "reward/std": float(flat.std(correction=0)),
                "reward/max": float(flat.max()),
                "response_length": tokens / len(flat),
                "rollout/tokens_per_s": tokens / rollout_s,
                "rollout/seconds": rollout_s,
                "score/seconds": score_s,
                "rollout/resyncs": float(self.resyncs),
                "rollout/compiled_steps": float(sum(r["compiled_steps"] for r in results)),
            },
        }


def _broadcast(value=None):
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sync_weights(trainer: RankTrainer, cfg, engines: list, version: int) -> tuple[float, int]:
    """Send this rank's part of policy `version` to every engine (all ranks call it); the
    seconds it took and the bytes this rank sent."""
    import ray

    began = time.perf_counter()
    part = gather_full(trainer.chunks[0], cfg, trainer.layout)
    ref = ray.put(part)  # once, however many engines read it
    rank, world = dist.get_rank(), dist.get_world_size()
    ray.get([e.receive.remote(version, rank, world, ref) for e in engines])
    dist.barrier()
    return time.perf_counter() - began, nbytes(part)


def trainer_logits(trainer: RankTrainer, sequences: list[list[int]]) -> torch.Tensor | None:
    """The trainer's full-vocabulary logits at each sequence's last token (fp32), on the last
    pipeline stage (None elsewhere); every rank runs the forward."""
    lengths = [len(s) for s in sequences]
    tp = trainer.layout.tp
    seq = -(-max(lengths) // tp) * tp  # sequence parallelism splits the sequence over TP
    tokens = torch.full((len(sequences), seq), PAD, dtype=torch.long)
    for r, s in enumerate(sequences):
        tokens[r, : len(s)] = torch.tensor(s)
    device = runtime.device()
    positions = torch.arange(seq).expand(len(sequences), seq)
    last = torch.tensor(lengths) - 1

    def step(data_iterator, model):
        next(data_iterator)
        output = model(tokens.to(device), positions.to(device), None)

        def loss_func(logits: torch.Tensor):
            full = gather_from_tensor_model_parallel_region(logits.float())
            picked = full[torch.arange(len(sequences)), last.to(full.device)]
            return full.sum() * 0, {"logits": picked.detach().cpu()}

        return output, loss_func

    with torch.no_grad():
        out = get_forward_backward_func()(
            forward_step_func=step,
            data_iterator=data_iterators([None], trainer.chunks),
            model=trainer.chunks,
            num_microbatches=1,
            seq_length=seq,
            micro_batch_size=len(sequences),
            forward_only=True,
        )
    aux_loss.reset()
    return out[0]["logits"] if out else None


def probe_diff(trainer: RankTrainer, engine, sequences: list[list[int]]) -> float:
    """max |engine logits - trainer logits| over the probe sequences (all ranks call it)."""
    import ray

    theirs = _broadcast(ray.get(engine.probe.remote(sequences)) if dist.get_rank() == 0 else None)
    ours = trainer_logits(trainer, sequences)
    diff = torch.zeros(1, dtype=torch.float64, device=runtime.device())
    if ours is not None:
        diff += (ours[:, : theirs.shape[1]] - theirs).abs().max().double().to(diff.device)
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return float(diff)


class _Log:
    """Rank 0's MLflow run, progress lines and rollouts file (other ranks: nothing)."""

    def __init__(self, job: RlhfJob, layout, start: int):
        self.tracker, self.rollouts = None, None
        if dist.get_rank() != 0:
            return
        if job.tracking_dir:
            self.tracker = RunTracker(Path(job.tracking_dir), tracking_uri=job.tracking_uri,
                                      experiment=job.experiment, run_name=job.name)  # fmt: skip
            flat = {k: v for k, v in job.to_dict().items() if not isinstance(v, dict)}
            self.tracker.log_params(
                {**flat, **{f"rollout.{k}": v for k, v in job.to_dict()["rollout"].items()},
                 **{f"layout.{k}": v for k, v in vars(layout).items()},
                 "train.lr": job.train.lr, "dpo.beta": job.dpo.beta,
                 "grpo.clip": job.grpo.clip, "grpo.kl_coef": job.grpo.kl_coef}
            )  # fmt: skip
            self.tracker.set_tags(job.tags)
            self.rollouts = Path(job.tracking_dir).parent / "rollouts.jsonl"
            kept = []
            if self.rollouts.is_file():  # a resumed run drops what it will sample again
                kept = [line for line in self.rollouts.read_text().splitlines()
                        if json.loads(line)["iteration"] < start]  # fmt: skip
            self.rollouts.write_text("".join(line + "\n" for line in kept))

    def iteration(self, job: RlhfJob, iteration: int, batch: dict, metrics: dict) -> None:
        if dist.get_rank() != 0:
            return
        print(
            f"iteration {iteration + 1}/{job.iterations} reward {metrics['reward/mean']:.3f} "
            f"loss {metrics['loss']:.4f} kl {metrics['kl']:.4f} rollout "
            f"{metrics['rollout/tokens_per_s']:,.0f} tok/s step {metrics['train/step_time_s']:.2f}"
            f" s sync {metrics['sync/seconds']:.2f} s (v{batch['version']} -> v{iteration + 1})",
            flush=True,
        )
        if self.tracker:
            self.tracker.log_metrics(iteration + 1, metrics)
        if self.rollouts:
            with self.rollouts.open("a") as f:
                for g in batch["groups"]:
                    record = {"iteration": iteration, "version": batch["version"],
                              "prompt": g["index"], "responses": g["texts"],
                              "response_tokens": g["responses"], "scores": g["scores"]}  # fmt: skip
                    f.write(json.dumps(record) + "\n")

    def close(self) -> None:
        if self.tracker:
            self.tracker.close()


def run(
    job: RlhfJob,
    sink: Sink,
    engines: list,
    scorer: Callable | None,
    *,
    after_rollout: Callable[[int, list], None] | None = None,
) -> dict[str, float]:
    """Run (or resume) `job` on this rank; `scorer` (upcycle.rlhf.scorers) is rank 0's. The last
    iteration's metrics. `after_rollout(iteration, engines)` runs on rank 0 between an iteration's
    rollouts and its training (the fault test kills an engine there)."""
    cfg = read_model_config(Path(job.policy))
    tasks = read_tasks(Path(job.prompts), job, cfg)
    seq_length = job.seq_length(tasks)
    trainer = RankTrainer.build(cfg, job.trainer_layout(dist.get_world_size()),
                                job.train_config(seq_length))  # fmt: skip
    layout = trainer.layout
    start = trainer.start(sink, resume_from=None, init_from=job.policy)
    reference = trainer.frozen_copy(cfg, job.policy)
    objective = (
        Grpo(job.grpo.clip, job.grpo.kl_coef)
        if job.objective == "grpo"
        else OnlineDpo(job.dpo.beta)
    )
    rows = job.rollout.samples if job.objective == "grpo" else 2
    dp, dp_rank = (
        parallel_state.get_data_parallel_world_size(),
        parallel_state.get_data_parallel_rank(),
    )
    n_micro = job.prompts_per_iteration // dp // layout.micro_batch_size
    schedule = dict(num_microbatches=n_micro, seq_length=seq_length,
                    micro_batch_size=layout.micro_batch_size * rows)  # fmt: skip
    forward_backward = get_forward_backward_func()
    coordinator = Coordinator(job, tasks, engines, scorer) if dist.get_rank() == 0 else None
    probes = [t["ids"] for t in tasks[:PROBES]]
    log = _Log(job, layout, start // job.steps_per_iteration)
    version = start // job.steps_per_iteration
    sync_weights(trainer, cfg, engines, version)  # a resumed run's engines hold version 0
    metrics: dict[str, float] = {}
    for iteration in range(version, job.iterations):
        iteration_began = time.perf_counter()
        for _attempt in range(MAX_RESYNCS + 1):  # resync engines that lost the current version
            batch = _broadcast(coordinator.rollouts(iteration, version) if coordinator else None)
            if batch is not None:
                break
            sync_weights(trainer, cfg, engines, version)
        else:
            raise RuntimeError(f"iteration {iteration + 1}: the engines never held version "
                               f"{version} after {MAX_RESYNCS} syncs")  # fmt: skip
        if after_rollout and coordinator:
            after_rollout(iteration, engines)
        began = time.perf_counter()
        micro = micro_batches(batch["groups"], job.objective, seq_length, dp_rank=dp_rank,
                              dp_size=dp, micro_batch_size=layout.micro_batch_size)  # fmt: skip
        objective.reference.run(forward_backward, reference, micro, **schedule)
        if job.objective == "grpo" and job.steps_per_iteration > 1:
            objective.old.run(forward_backward, trainer.chunks, micro, **schedule)
        aux_loss.reset()  # the frozen passes' router losses are not the policy's
        for _ in range(job.steps_per_iteration):
            trainer.zero_grad()
            losses = forward_backward(forward_step_func=objective.step,
                                      data_iterator=data_iterators(micro, trainer.chunks),
                                      model=trainer.chunks, forward_only=False, **schedule)  # fmt: skip
            stepped = trainer.step()
            metrics = reduce_step_metrics(cfg, KEYS[job.objective], losses, n_micro)
        step_s = time.perf_counter() - began
        version = iteration + 1
        sync_s, sent = sync_weights(trainer, cfg, engines, version)
        total = torch.tensor([float(sent)], dtype=torch.float64, device=runtime.device())
        dist.all_reduce(total)
        metrics.update(
            **stepped,
            **(batch["metrics"]),
            **{"train/step_time_s": step_s, "sync/seconds": sync_s, "sync/bytes": float(total),
               "sync/max_logit_diff": probe_diff(trainer, engines[0], probes),
               "version": float(version)},
        )  # fmt: skip
        metrics["iteration/seconds"] = time.perf_counter() - iteration_began
        log.iteration(job, iteration, batch, metrics)
        done = version * job.steps_per_iteration
        if version == job.iterations or (job.save_interval and version % job.save_interval == 0):
            headline = {k: metrics[k] for k in ("loss", "reward/mean", "kl")}
            trainer.save(sink, done, cfg, job.name, {"step": done, **headline})
    log.close()
    return metrics

"""The work behind `upcycle pipeline`'s stages (upcycle.jobs.pipeline): the corpus's curation,
one Ray Train job per training stage, rejection sampling and best-of-N with their MLflow runs,
and the online RLHF run. Each reuses what an earlier pipeline run finished."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from upcycle.atomic import IntegrityError, verify_manifest
from upcycle.config import Layout, from_name
from upcycle.jobs.pipeline_config import PipelineConfig
from upcycle.platform.checkpoint import newest_valid
from upcycle.train_config import TrainConfig


def train(
    cfg: PipelineConfig,
    name: str,
    preset: str,
    data: Path,
    layout: Layout,
    steps: int,
    init_from: Path | None,
    objective: str = "pretrain",
) -> Path:
    """Train (or resume) one stage's job on Ray Train; its newest valid checkpoint."""
    from upcycle.training.job import TrainJob
    from upcycle.training.ray_train import fit

    storage = Path(cfg.out).absolute() / "train"
    job = TrainJob(
        model=from_name(preset),
        data=str(data),
        layout=dataclasses.replace(layout, micro_batch_size=2, global_batch_size=8),
        train=TrainConfig(
            steps=steps,
            seq_length=cfg.seq_length,
            save_interval=steps,
            lr=cfg.lr if objective == "pretrain" else cfg.post_lr,
            min_lr=min(3e-5, cfg.post_lr),
            warmup_steps=4 if objective == "pretrain" else 2,
        ),  # fmt: skip
        objective=objective,
        init_from=str(init_from) if init_from else None,
        name=name,
        tracking_uri=cfg.tracking_uri,
    )
    return _newest(fit(job, num_workers=cfg.workers, storage_path=storage, max_failures=1),
                   storage / job.name)  # fmt: skip


def rlhf(cfg: PipelineConfig, policy: Path, reward: Path, prompts: Path) -> Path:
    """Online DPO of `policy` scored by the reward model (or resume it); its newest checkpoint."""
    from upcycle.rlhf.driver import fit
    from upcycle.rlhf.spec import RlhfJob, RolloutConfig

    storage = Path(cfg.out).absolute() / "train"
    job = RlhfJob(
        policy=str(policy), prompts=str(prompts), objective="online_dpo", scorer=str(reward),
        iterations=cfg.rlhf_iterations, prompts_per_iteration=4,
        rollout=RolloutConfig(samples=4, max_tokens=16), layout=Layout(ep=2),
        train=TrainConfig(steps=cfg.rlhf_iterations, lr=cfg.post_lr, min_lr=0.0, warmup_steps=0),
        name="pipeline-rlhf", tracking_uri=cfg.tracking_uri,
    )  # fmt: skip
    return _newest(fit(job, num_workers=cfg.workers, storage_path=storage, max_failures=1),
                   storage / job.name)  # fmt: skip


def rejection_sampling(cfg: PipelineConfig, ckpt: Path, out: Path) -> float:
    """Generate samples of arithmetic prompts (Ray Data), keep what the exact verifier accepts
    (SFT/DPO files, an MLflow run); the acceptance rate. Reuses a finished earlier run."""

    from upcycle.jobs import chat_demo
    from upcycle.jobs.synthesize import run_generate, run_rejection
    from upcycle.synthesis.generation import GenerateSpec

    rejection = out / "rejection"
    if not valid(rejection):
        out.mkdir(parents=True, exist_ok=True)
        prompts, generated = out / "prompts.jsonl", out / "generated.jsonl"
        records = chat_demo.arithmetic_prompts(cfg.synth_prompts)
        prompts.write_text("".join(json.dumps(r) + "\n" for r in records))
        if not generated.exists():  # written whole (renamed) or not at all
            spec = GenerateSpec(samples=cfg.synth_samples, temperature=1.0, max_tokens=16)
            engine = {"max_model_len": 256, "max_num_seqs": 16}
            run_generate(str(ckpt), prompts, generated, spec, workers=1, engine=engine)
        run_rejection(generated, rejection, verifier_name="exact",
                      run_name="pipeline-rejection", tracking_uri=cfg.tracking_uri)  # fmt: skip
    return json.loads((rejection / "report.json").read_text())["acceptance_rate"]


def best_of_n(cfg: PipelineConfig, reward_ckpt: Path, synth: Path) -> int:
    """Score the generated samples with the reward model (Ray Data) and keep each prompt's best
    (`--verifier reward`); the number of DPO pairs. Reuses a finished earlier run."""

    from upcycle.jobs.synthesize import run_rejection, run_reward_score

    best = synth / "best-of-n"
    if not valid(best):
        scored = synth / "scored.jsonl"
        if not scored.exists():  # written whole (renamed) or not at all
            run_reward_score(str(reward_ckpt), synth / "generated.jsonl", scored,
                             max_length=cfg.seq_length, workers=1)  # fmt: skip
        run_rejection(scored, best, verifier_name="reward", run_name="pipeline-best-of-n",
                      tracking_uri=cfg.tracking_uri)  # fmt: skip
    return json.loads((best / "report.json").read_text())["dpo_pairs"]


def _newest(outcome, folder: Path) -> Path:
    """A Ray Train run's newest valid checkpoint under `folder` (its error, if it failed)."""
    if outcome.error is not None:
        raise outcome.error
    ckpt = newest_valid(sorted(folder.glob("step_*[0-9]")))
    if ckpt is None:
        raise RuntimeError(f"no valid checkpoint under {folder}")
    return ckpt


# The main job's curation recipe for the stdlib's source (examples/curation/stdlib-code.yaml);
# the pipeline adds its held-out modules to what is decontaminated against
STDLIB_RECIPE = {
    "filters": {
        "word_count": {"min": 50},
        "alphabetic_word_share": {"min": 0.6},
        "top_2gram_share": {"max": 0.2},
        "max_line_length": {"max": 1000},
    },
    "dedup": {"threshold": 0.7},
    "decontaminate": {"against": ["humaneval"], "ngram": 13},
}


def curate(
    cfg: PipelineConfig, root: Path, files: list[Path], heldout: list[Path]
) -> tuple[Path, str]:
    """Filter, deduplicate and decontaminate (against the held-out modules and HumanEval) the
    training files into root/{filter,dedup,decontaminate} (upcycle.jobs.curate.run_curate),
    the clean documents' file and the line that says what each step kept."""
    from upcycle.curation.recipe import Recipe
    from upcycle.jobs.curate import run_curate

    recipe = dict(STDLIB_RECIPE)
    recipe["decontaminate"] = {**recipe["decontaminate"],
                               "against": ["humaneval", *map(str, heldout)]}  # fmt: skip
    steps = run_curate(files, root, recipe=Recipe.from_dict(recipe), workers=cfg.workers,
                       tracking_uri=cfg.tracking_uri, run_name="pipeline")  # fmt: skip
    counts = " -> ".join(f"{step} {report['documents_out']}" for step, report in steps)
    line = f"curation: {len(files)} files -> {counts} documents"
    return root / steps[-1][0] / "documents.jsonl", line


def valid(folder: Path) -> bool:
    """Whether `folder` is a finished, verified output (its manifest checks out)."""
    try:
        verify_manifest(folder)
    except (IntegrityError, OSError):
        return False
    return True

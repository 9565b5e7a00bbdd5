"""`upcycle generate`, `upcycle reward score` and `upcycle synthesize rejection`: sample at
scale, score with a reward model, then keep what a verifier accepts as SFT/DPO data (tracked in
MLflow)."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from upcycle.platform.tracking import RunTracker, default_tracking_uri
from upcycle.synthesis.generation import Generated, GenerateSpec, generate, read_prompts
from upcycle.synthesis.rejection import Rejection, read_generated, reject, write
from upcycle.synthesis.sandbox import DEFAULT, Sandbox
from upcycle.synthesis.verifiers import check_name
from upcycle.training.data import DataError

# tokens per prompt + reply that `upcycle reward score` scores, unless the model's context is less
SCORE_LENGTH = 1024


@dataclass(frozen=True)
class Scored:
    records: int
    tokens: int
    seconds: float
    max_length: int  # what was used: the one asked for, else SCORE_LENGTH or the model's context


def run_rejection(
    generated: Path,
    out: Path,
    *,
    verifier_name: str,
    sandbox: Sandbox = DEFAULT,
    run_name: str | None = None,
    experiment: str = "upcycle",
    tracking_uri: str | None = None,
) -> Rejection:
    """Verify every sample of `generated` and write OUT (rejection.py); one MLflow run with the
    overall and per-prompt acceptance and report.json as an artifact. The verifier, the output
    folder and (for `execution`) the sandbox are checked before the file is read."""
    check_name(verifier_name)
    if Path(out).exists() and any(Path(out).iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose a new output folder")
    if verifier_name == "execution":
        sandbox.require()
    result = reject(read_generated(Path(generated)), verifier_name, sandbox)
    write(result, Path(out))
    r = result.report
    tracker = RunTracker(
        Path(tempfile.mkdtemp(prefix="upcycle-synthesize-")),
        tracking_uri=tracking_uri or default_tracking_uri(),
        experiment=experiment,
        run_name=run_name or f"rejection-{Path(generated).stem}",
    )
    tracker.log_params({"generated": Path(generated).absolute(), "out": Path(out).absolute(),
                        "verifier": verifier_name, "sandbox": sandbox.kind,
                        "timeout_s": sandbox.seconds,
                        "memory_bytes": sandbox.memory_bytes})  # fmt: skip
    tracker.set_tags({"kind": "synthesis"})
    summary = ("prompts", "samples", "accepted", "acceptance_rate", "sft_conversations",
               "dpo_pairs", "prompts_with_an_accepted_sample")  # fmt: skip
    tracker.log_metrics(0, {k: r[k] for k in summary})
    for i, p in enumerate(r["per_prompt"]):  # step = the prompt's index in the file
        tracker.log_metrics(i, {"prompt_acceptance_rate": p["rate"]})
    tracker.log_artifact(Path(out) / "report.json")
    tracker.close()
    return result


def run_generate(
    model: str, prompts_path: Path, out: Path, spec: GenerateSpec, *, workers: int, engine: dict
) -> Generated:
    """`upcycle generate`: every check (spec, prompts, model, engine, prompt lengths) before
    any actor starts, then batch generation on the connected Ray cluster (generation.py).
    `engine` is the serve spec's engine section; max_model_len None or absent: GENERATE_LENGTH,
    or the model's context where that is shorter."""
    from upcycle.synthesis.writer import Writer

    writer = Writer.load(model, spec, workers=workers, engine=engine)
    prompts = read_prompts(Path(prompts_path))
    for i, record in enumerate(prompts):
        try:
            writer.check(record, i)
        except ValueError as e:
            raise DataError(f"{prompts_path}: prompt {i + 1}: {e}") from None
    from upcycle.platform.cluster import ensure_ray

    ensure_ray()
    return generate(writer.ckpt, writer.runner, prompts, spec, Path(out), workers=workers)


def run_reward_score(
    model: str, in_path: Path, out: Path, *, max_length: int | None, workers: int
) -> Scored:
    """`upcycle reward score`: every check (model is a reward model, lengths, the file) before
    any actor starts, then scoring on the connected Ray cluster (scoring.py). `max_length`
    None: SCORE_LENGTH, or the model's context where that is shorter."""
    from upcycle.config import ConfigError
    from upcycle.deploy.sources import default_cache_dir, resolve
    from upcycle.platform.checkpoint import read_model_config
    from upcycle.synthesis.scoring import read_scorable, score_file

    if workers < 1:
        raise ValueError(f"workers: must be >= 1, got {workers}")
    ckpt = resolve(model, cache_dir=default_cache_dir())
    cfg = read_model_config(ckpt)
    if not cfg.is_reward_model:
        raise ConfigError(
            "model",
            f"{model} is a language model, not a reward model (no score head); train one with "
            "`upcycle reward train` or import a transformers *ForSequenceClassification folder",
        )
    if max_length is None:
        max_length = min(SCORE_LENGTH, cfg.max_position_embeddings)
    if not 1 < max_length <= cfg.max_position_embeddings:
        raise ValueError(
            f"max_length: must be in 2..{cfg.max_position_embeddings} (the model's "
            f"max_position_embeddings), got {max_length}"
        )
    records, tokens = read_scorable(Path(in_path), max_length)
    from upcycle.platform.cluster import ensure_ray

    ensure_ray()
    seconds = score_file(ckpt, records, Path(out), max_length=max_length, workers=workers)
    return Scored(len(records), tokens, seconds, max_length)

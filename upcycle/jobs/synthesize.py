"""`upcycle generate` and `upcycle synthesize rejection`: sample at scale, then keep what a
verifier accepts as SFT/DPO data (tracked in MLflow)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from upcycle.platform.data import DataError
from upcycle.platform.tracking import RunTracker, default_tracking_uri
from upcycle.synthesis.generation import (
    Generated,
    GenerateSpec,
    generate,
    prompt_ids,
    read_prompts,
)
from upcycle.synthesis.rejection import Rejection, read_generated, reject, write
from upcycle.synthesis.sandbox import DEFAULT_LIMITS, Limits
from upcycle.synthesis.verifiers import verifier


def run_rejection(
    generated: Path,
    out: Path,
    *,
    verifier_name: str,
    limits: Limits = DEFAULT_LIMITS,
    run_name: str | None = None,
    experiment: str = "upcycle",
    tracking_uri: str | None = None,
) -> Rejection:
    """Verify every sample of `generated` and write OUT (rejection.py); one MLflow run with the
    overall and per-prompt acceptance and report.json as an artifact."""
    verifier(verifier_name)  # an unknown verifier fails before the file is read
    if Path(out).exists() and any(Path(out).iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose a new output folder")
    result = reject(read_generated(Path(generated)), verifier_name, limits)
    write(result, Path(out))
    r = result.report
    tracker = RunTracker(
        Path(tempfile.mkdtemp(prefix="upcycle-synthesize-")),
        tracking_uri=tracking_uri or default_tracking_uri(),
        experiment=experiment,
        run_name=run_name or f"rejection-{Path(generated).stem}",
    )
    tracker.log_params({"generated": Path(generated).absolute(), "out": Path(out).absolute(),
                        "verifier": verifier_name, "timeout_s": limits.seconds,
                        "memory_bytes": limits.memory_bytes})  # fmt: skip
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
    any actor starts, then batch generation on the connected Ray cluster (generation.py)."""
    from upcycle.deploy.app import engine_limits, resolve_model
    from upcycle.deploy.engine import check_request
    from upcycle.deploy.spec import ServeSpec

    spec.check()
    if workers < 1:
        raise ValueError(f"workers: must be >= 1, got {workers}")
    prompts = read_prompts(Path(prompts_path))
    serve_spec = ServeSpec.parse({"model": model, "engine": engine}, "command line")
    ckpt, _cfg = resolve_model(serve_spec)
    rc = serve_spec.engine
    vocab_limit, _ = engine_limits(str(ckpt))
    for i, record in enumerate(prompts):
        try:
            check_request(prompt_ids(record), spec.params(i, 0), max_model_len=rc.max_model_len,
                          vocab_limit=vocab_limit)  # fmt: skip
        except ValueError as e:
            raise DataError(f"{prompts_path}: prompt {i + 1}: {e}") from None
    from upcycle.platform.cluster import ensure_ray

    ensure_ray()
    return generate(ckpt, rc.model_dump(), prompts, spec, Path(out), workers=workers)

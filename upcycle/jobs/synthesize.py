"""`upcycle synthesize rejection`: verify generated samples, write SFT/DPO data, track the run."""

from __future__ import annotations

import tempfile
from pathlib import Path

from upcycle.platform.tracking import RunTracker, default_tracking_uri
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

"""`upcycle eval --humaneval`: generate completions of HumanEval's problems through the serving
engine, run each in the execution sandbox, log pass@k as an MLflow run with every completion.
The sandbox is checked before anything is generated: a machine where it cannot run fails in
seconds, not after the generation."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from upcycle.jobs.synthesize import run_generate
from upcycle.platform.tracking import RunTracker, default_tracking_uri
from upcycle.synthesis import humaneval
from upcycle.synthesis.generation import GenerateSpec
from upcycle.synthesis.sandbox import DEFAULT, Sandbox
from upcycle.synthesis.verifiers import side_by_side, verify_execution


@dataclass(frozen=True)
class HumanEvalResult:
    problems: int
    samples: int
    pass_at: dict[int, float]  # k -> mean pass@k over problems
    records: list[dict]  # one per completion: task_id, sample, completion, passed, detail


def run(
    ckpt: Path,
    *,
    samples: int = 1,
    temperature: float | None = None,
    max_tokens: int = 256,
    limit: int | None = None,
    workers: int = 1,
    seed: int = 0,
    engine: dict | None = None,
    sandbox: Sandbox = DEFAULT,
    run_name: str | None = None,
    experiment: str = "upcycle",
    tracking_uri: str | None = None,
) -> HumanEvalResult:
    """pass@1 (and pass@k for k = samples) over the first `limit` problems (default all 164).
    Greedy for one sample, temperature 0.8 for several (Chen et al.'s settings) unless given."""
    if temperature is None:
        temperature = 0.0 if samples == 1 else 0.8
    sandbox.require()
    tasks = humaneval.tasks(limit)
    spec = GenerateSpec(samples=samples, temperature=temperature, max_tokens=max_tokens,
                        seed=seed, stop=humaneval.STOP)  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        prompts, generated = Path(tmp) / "prompts.jsonl", Path(tmp) / "generated.jsonl"
        prompts.write_text("".join(json.dumps(t) + "\n" for t in tasks))
        engine = engine or {"max_model_len": 1024, "max_num_seqs": 16}
        run_generate(str(ckpt), prompts, generated, spec, workers=workers, engine=engine)
        rows = [json.loads(line) for line in generated.read_text().splitlines()]
    jobs = [(row, k, s["text"]) for row in rows for k, s in enumerate(row["samples"])]
    verdicts = side_by_side(lambda job: verify_execution(job[2], job[0], sandbox), jobs)
    records = [{"task_id": row["task_id"], "sample": k, "completion": text,
                "passed": v.accepted, "detail": v.detail}
               for (row, k, text), v in zip(jobs, verdicts, strict=True)]  # fmt: skip
    passed = {row["task_id"]: 0 for row in rows}
    for r in records:
        passed[r["task_id"]] += r["passed"]
    ks = sorted({1, samples})
    pass_at = {k: sum(humaneval.pass_at_k(samples, c, k) for c in passed.values()) / len(rows)
               for k in ks}  # fmt: skip
    tracker = RunTracker(
        Path(tempfile.mkdtemp(prefix="upcycle-humaneval-")),
        tracking_uri=tracking_uri or default_tracking_uri(),
        experiment=experiment,
        run_name=run_name or f"humaneval-{Path(ckpt).name}",
    )
    tracker.log_params({"checkpoint": Path(ckpt).absolute(), "samples": samples,
                        "temperature": temperature, "max_tokens": max_tokens,
                        "problems": len(rows), "seed": seed,
                        "sandbox": sandbox.kind})  # fmt: skip
    tracker.set_tags({"kind": "eval", "evaluates": str(Path(ckpt).absolute())})
    tracker.log_metrics(0, {f"humaneval_pass_at_{k}": v for k, v in pass_at.items()})
    with tempfile.TemporaryDirectory() as tmp:
        artifact = Path(tmp) / "humaneval_completions.jsonl"
        artifact.write_text("".join(json.dumps(r) + "\n" for r in records))
        tracker.log_artifact(artifact)
    tracker.close()
    return HumanEvalResult(len(rows), samples, pass_at, records)

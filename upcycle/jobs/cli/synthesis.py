"""`upcycle synthesize rejection`: machine-made post-training data from generated samples."""

from __future__ import annotations

from pathlib import Path

import typer

from upcycle.jobs.cli.common import console, fail, synthesize_app


@synthesize_app.command("rejection")
def rejection(
    generated: Path = typer.Argument(..., help="a generated JSONL file (upcycle generate)"),
    out: Path = typer.Argument(..., help="new folder for sft.jsonl, dpo.jsonl, report.json"),
    verifier: str = typer.Option(..., help="exact (final answer) or execution (run the tests)"),
    timeout: float = typer.Option(10.0, min=0.1, help="execution: seconds per program"),
    memory_gib: float = typer.Option(1.0, min=0.1, help="execution: address space per program"),
    run_name: str = typer.Option(None, help="MLflow run name"),
) -> None:
    """Keep the samples a verifier accepts as SFT conversations, pair accepted with rejected
    samples of the same prompt for DPO, and report acceptance (an MLflow run)."""
    from upcycle.jobs.synthesize import run_rejection
    from upcycle.synthesis.sandbox import Limits

    limits = Limits(seconds=timeout, memory_bytes=int(memory_gib * 2**30))
    try:
        result = run_rejection(generated, out, verifier_name=verifier, limits=limits,
                               run_name=run_name)  # fmt: skip
    except (ValueError, FileExistsError) as e:  # DataError is a ValueError
        fail(str(e))
    r = result.report
    console.print(
        f"{r['accepted']} of {r['samples']} samples accepted ({r['acceptance_rate']:.0%}) over "
        f"{r['prompts']} prompts; {r['sft_conversations']} SFT conversations, "
        f"{r['dpo_pairs']} DPO pairs in {out}"
    )

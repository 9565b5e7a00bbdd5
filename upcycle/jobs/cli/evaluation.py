"""`upcycle eval` and `upcycle pipeline` (the main job)."""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from upcycle.config import ConfigError
from upcycle.jobs.cli.common import (
    ADDRESS_HELP,
    SANDBOX_HELP,
    app,
    console,
    fail,
    submit_if_remote,
)


@app.command("eval")
def evaluate(
    checkpoint: Path = typer.Argument(..., exists=True, file_okay=False, help="our checkpoint"),
    data: Path = typer.Option(
        None, exists=True, file_okay=False, help="held-out token shards (perplexity, needle)"
    ),
    seq_length: int = typer.Option(128, min=1, help="tokens per window"),
    max_windows: int = typer.Option(64, min=1, help="windows evaluated (from the start)"),
    needle: bool = typer.Option(False, help="also run needle-in-a-haystack over the grid below"),
    lengths: str = typer.Option("256,512,1024", help="needle: context lengths in tokens"),
    depths: str = typer.Option("0,0.25,0.5,0.75,1", help="needle: depths (0 start, 1 end)"),
    trials: int = typer.Option(2, min=1, help="needle: prompts per (length, depth) cell"),
    dual_chunk_length: int = typer.Option(
        0, min=0, help="needle: Dual Chunk Attention for the trained length N (0: off)"
    ),
    humaneval: bool = typer.Option(False, help="HumanEval pass@k (generate, run the tests)"),
    samples: int = typer.Option(1, min=1, help="humaneval: completions per problem"),
    problems: int = typer.Option(None, min=1, help="humaneval: the first N problems (all 164)"),
    max_tokens: int = typer.Option(256, min=1, help="humaneval: tokens per completion"),
    workers: int = typer.Option(1, min=1, help="humaneval: engine actors generating"),
    sandbox: str = typer.Option("bwrap", help=f"humaneval: {SANDBOX_HELP}"),
    run_name: str = typer.Option(None, help="MLflow run name (default: eval-MODEL)"),
    address: str = typer.Option(None, help=ADDRESS_HELP),
) -> None:
    """Held-out perplexity of a checkpoint and, with --needle, needle-in-a-haystack retrieval
    (Ray tasks), recorded as one MLflow run with a heatmap of the needle grid; with --humaneval,
    HumanEval pass@1 (and pass@K for --samples K) as an MLflow run with every completion."""
    if data is None and not humaneval:
        fail("give --data HELDOUT (perplexity, --needle) and/or --humaneval")
    if needle and data is None:
        fail("--needle reads its haystacks from --data HELDOUT")
    if humaneval:
        from upcycle.jobs import humaneval as he
        from upcycle.synthesis.sandbox import Sandbox, SandboxUnavailable

        try:
            box = Sandbox(kind=sandbox)
        except ValueError as e:
            fail(str(e))
        submit_if_remote(address)
        from upcycle.platform.cluster import ensure_ray

        ensure_ray()
        try:
            res = he.run(checkpoint, samples=samples, max_tokens=max_tokens, limit=problems,
                         workers=workers, sandbox=box,
                         run_name=run_name and f"{run_name}-humaneval")  # fmt: skip
        except (ValueError, ConfigError, FileNotFoundError, SandboxUnavailable) as e:
            fail(str(e))
        console.print(f"HumanEval, {res.problems} problems x {res.samples} samples: "
                      + ", ".join(f"pass@{k} {v:.3f}" for k, v in res.pass_at.items()))  # fmt: skip
        if data is None:
            return
    import tempfile

    from upcycle.jobs.evaluate import run
    from upcycle.jobs.needle import NeedleSpec
    from upcycle.platform.checkpoint import CheckpointError
    from upcycle.platform.cluster import ensure_ray
    from upcycle.training.data import DataError

    try:
        spec = None
        if needle:
            spec = NeedleSpec(
                lengths=_numbers(lengths, int, "--lengths"),
                depths=_numbers(depths, float, "--depths"),
                trials=trials,
                dual_chunk_length=dual_chunk_length,
            )
        submit_if_remote(address)
        ensure_ray()
        spool = Path(tempfile.mkdtemp(prefix="upcycle-eval-"))
        r, found = run(
            checkpoint, data, spool_dir=spool, seq_length=seq_length, max_windows=max_windows,
            needle=spec, run_name=run_name,
        )  # fmt: skip
    except (ConfigError, CheckpointError, DataError) as e:
        fail(str(e))
    console.print(
        f"{r.model}: held-out loss {r.loss:.4f}, perplexity {r.perplexity:,.2f} over "
        f"{r.tokens:,} tokens ({r.data})"
    )
    if found:
        table = Table("length", *(f"depth {d:g}" for d in spec.depths), title="needle retrieval")
        for length, row in zip(spec.lengths, found.accuracy(), strict=True):
            table.add_row(str(length), *(f"{v:.2f}" for v in row))
        console.print(table)
        console.print(f"needle accuracy {found.metrics()['niah_accuracy']:.3f}")


def _numbers(text: str, kind, option: str) -> tuple:
    try:
        return tuple(kind(x) for x in text.split(","))
    except ValueError:
        raise typer.BadParameter(f"{text!r}: comma-separated numbers", param_hint=option) from None


@app.command()
def pipeline(
    out: Path = typer.Option(Path("runs/pipeline"), help="where data, checkpoints, evals go"),
    workers: int = typer.Option(2, min=2, help="Ray Train workers (the MoE uses ep=2)"),
    dense_steps: int = typer.Option(100, min=1, help="pretraining steps of tiny-dense"),
    moe_steps: int = typer.Option(40, min=1, help="training steps after upcycling"),
    sft_steps: int = typer.Option(30, min=1, help="SFT steps of the MoE"),
    dpo_steps: int = typer.Option(16, min=1, help="DPO steps after SFT"),
    address: str = typer.Option(None, help=ADDRESS_HELP),
) -> None:
    """The main job: corpus -> pretrain tiny-dense -> upcycle to tiny-moe -> continue training
    -> SFT -> DPO -> perplexity of each, needle in a haystack (DCA) of the final model -> serve
    it and chat once -> the MLflow runs."""
    from upcycle.jobs.pipeline import StageError, run
    from upcycle.jobs.pipeline_config import PipelineConfig

    submit_if_remote(address)
    config = PipelineConfig(
        out=out, workers=workers, dense_steps=dense_steps, moe_steps=moe_steps,
        sft_steps=sft_steps, dpo_steps=dpo_steps,
    )  # fmt: skip
    started = time.perf_counter()
    try:
        result = run(config, console)
    except StageError as e:
        console.print(f"[red]error:[/red] {escape(str(e))}")
        raise typer.Exit(1) from None
    console.print(
        f"pipeline done in {time.perf_counter() - started:.0f} s; held-out perplexity "
        f"dense {result.perplexity['dense']:,.1f} -> upcycled MoE {result.perplexity['moe']:,.1f}"
        f" -> after SFT + DPO {result.perplexity['dpo']:,.1f}; needle accuracy "
        f"{result.needle_accuracy:.2f}"
    )

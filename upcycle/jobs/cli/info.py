"""`upcycle model info`, `plan` and `verify`: model sizes, layouts, parity with transformers."""

from __future__ import annotations

import json
from dataclasses import asdict

import typer
from rich.table import Table

from upcycle.config import ConfigError
from upcycle.jobs.cli.common import (
    app,
    console,
    fail,
    model_app,
    parse_preset,
)


@model_app.command("info")
def model_info(
    preset: str = typer.Argument(..., help="A preset name, e.g. qwen2-57b-a14b"),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Total and active parameter counts and bf16 weight bytes, built on the meta device."""
    from upcycle.moe.model import build_on_meta
    from upcycle.moe.params import count_parameters
    from upcycle.platform.distributed import single_process

    cfg = parse_preset(preset)
    with single_process():
        counts = count_parameters(build_on_meta(cfg), cfg)
    if as_json:
        print(json.dumps(asdict(counts)))
        return
    table = Table(title=f"{cfg.name}")
    for col in ("total params", "active params", "bf16 weights"):
        table.add_column(col, justify="right")
    table.add_row(
        f"{counts.total_params:,}",
        f"{counts.active_params:,}",
        f"{counts.bf16_bytes / 2**30:.2f} GiB",
    )
    console.print(table)


@app.command()
def plan(
    model: str = typer.Option(..., help="preset name, e.g. qwen2-57b-a14b"),
    gpus: int = typer.Option(..., min=1, help="GPUs to train on"),
    gpu_memory: float = typer.Option(..., help="memory per GPU, GiB"),
    seq_len: int = typer.Option(4096, min=1),
    micro_batch: int = typer.Option(1, min=1),
    global_batch: int = typer.Option(512, min=1, help="sequences per step"),
    top: int = typer.Option(15, min=1, help="rows to print"),
) -> None:
    """Rank the TP/PP/EP/ETP/DP layouts that fit, by a cost model (see upcycle/platform/plan.py
    for the memory formulas and the assumptions)."""
    from upcycle.platform.plan import Workload, gib, plans

    work = Workload(seq_len=seq_len, micro_batch=micro_batch, global_batch=global_batch)
    try:
        found = plans(parse_preset(model), gpus=gpus, gpu_memory_gib=gpu_memory, work=work)
    except ConfigError as e:
        fail(str(e))
    if not found:
        fail(f"no layout of {model} fits {gpus} x {gpu_memory:g} GiB at seq {seq_len}, "
              f"micro-batch {micro_batch}; add GPUs or shorten the sequence")  # fmt: skip
    table = Table(title=f"{model} on {gpus} x {gpu_memory:g} GiB, seq {seq_len}, micro-batch "
                        f"{micro_batch}, global batch {global_batch} (GiB per GPU)")  # fmt: skip
    for col in ("rank", "tp", "pp", "ep", "etp", "dp", "dist opt", "recompute", "weights",
                "grads", "optim", "activ", "total", "expert GEMM", "step s", "MFU", "tok/s/GPU"):  # fmt: skip
        table.add_column(col, justify="right")
    for i, p in enumerate(found[:top], start=1):
        m, lay = p.memory, p.layout
        opt = m.optimizer_distributed if p.distributed_optimizer else m.optimizer
        act = m.activations_recompute if p.recompute else m.activations
        gemm = f"{p.expert_gemm[0]:,.0f} x {p.expert_gemm[1]}" if p.expert_gemm else "-"
        table.add_row(
            str(i), str(lay.tp), str(lay.pp), str(lay.ep), str(lay.expert_tp), str(lay.dp),
            "yes" if p.distributed_optimizer else "no", "yes" if p.recompute else "no",
            gib(m.weights), gib(m.grads), gib(opt), gib(act + m.logits), gib(p.bytes), gemm,
            f"{p.step_seconds:.2f}", f"{p.mfu:.0%}", f"{p.tokens_per_gpu_s:,.0f}",
        )  # fmt: skip
    console.print(table)
    console.print(f"{len(found)} layouts fit. expert GEMM: rows per local expert per micro-batch x "
                  "width; step s and MFU from a GEMM-shape cost model of H100 bf16 (assumptions: "
                  "upcycle/platform/plan.py)")  # fmt: skip


@app.command()
def verify(
    presets: list[str] = typer.Argument(
        None, help="presets to check (default: tiny-dense tiny-moe)"
    ),
    seq_len: int = typer.Option(64, min=1, help="tokens of real text to compare on"),
) -> None:
    """Check our model against transformers on the same random weights and real text."""
    from upcycle.jobs.verify import TOLERANCE
    from upcycle.jobs.verify import verify as run

    table = Table(title=f"upcycle vs transformers (fp32, tolerance {TOLERANCE:g})")
    for col in ("model", "params", "active", "tokens", "max |dlogit|", "greedy agree", "max |daux|",
                "ours s", "transformers s", "ok"):  # fmt: skip
        table.add_column(col, justify="right")
    ok = True
    for name in presets or ["tiny-dense", "tiny-moe"]:
        r = run(parse_preset(name), seq_len=seq_len)
        ok &= r.ok
        aux = "-" if r.aux_loss_diff is None else f"{r.aux_loss_diff:.2e}"
        table.add_row(
            r.model, f"{r.params:,}", f"{r.active_params:,}", str(r.tokens), f"{r.max_logit_diff:.2e}",
            f"{r.greedy_agreement:.0%}", aux, f"{r.seconds_ours:.3f}", f"{r.seconds_transformers:.3f}",
            "[green]yes[/green]" if r.ok else "[red]NO[/red]",
        )  # fmt: skip
    console.print(table)
    if not ok:
        raise typer.Exit(1)

"""`upcycle convert` (upcycling) and `checkpoint import-hf / export-hf`, in one process or on ranks."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from upcycle.config import ConfigError, ModelConfig
from upcycle.jobs.cli.common import (
    ADDRESS_HELP,
    app,
    checkpoint_app,
    console,
    fail,
    parse_dtype,
    submit_if_remote,
)

WORKERS_HELP = "run on N ranks (Ray actors), each converting only its shard; needs --layout"


LAYOUT_HELP = "with --workers: tp=..,pp=..,ep=..,etp=.. (dp: what is left)"


def _ranks(workers: int, layout: str | None):
    """--workers/--layout -> a Layout, or None for one process."""
    from upcycle.conversion.shards import parse_layout

    if not workers:
        if layout:
            fail("--layout needs --workers N")
        return None
    return parse_layout(layout or "")


def _print_ranks(reports) -> None:
    table = Table(title="per rank")
    for col in ("rank", "tp", "pp", "ep", "read MiB", "held MiB", "written MiB", "peak RSS MiB"):
        table.add_column(col, justify="right")
    for r in reports:
        c = r.coords
        table.add_row(str(r.rank), str(c.tp_rank), str(c.pp_rank), str(c.ep_rank),
                      *(f"{b / 2**20:,.1f}" for b in (r.bytes_read, r.bytes_held,
                                                      r.bytes_written, r.peak_rss_bytes)))  # fmt: skip
    console.print(table)


def _rank_failure(e: Exception) -> None:
    console.print(f"[red]error:[/red] {escape(str(e))}; nothing was written")
    raise typer.Exit(1)


@checkpoint_app.command("import-hf")
def import_hf(
    hf_dir: Path = typer.Argument(..., exists=True, file_okay=False, help="transformers folder"),
    out_dir: Path = typer.Argument(..., help="new folder for our checkpoint"),
    workers: int = typer.Option(0, help=WORKERS_HELP),
    layout: str = typer.Option(None, help=LAYOUT_HELP),
) -> None:
    """Convert a transformers Qwen2 / Qwen2-MoE safetensors folder into our checkpoint."""
    from upcycle.conversion.group import RankFailed
    from upcycle.dense.hf_weights import CheckpointError

    try:
        ranks = _ranks(workers, layout)
        if ranks is None:
            from upcycle.conversion.hf_interop import import_hf as run

            cfg = run(hf_dir, out_dir)
        else:
            from upcycle.conversion.distributed import import_on_ranks
            from upcycle.platform.cluster import ensure_ray

            ensure_ray()
            cfg, reports = import_on_ranks(hf_dir, out_dir, ranks, workers)
            _print_ranks(reports)
    except (CheckpointError, ConfigError, FileExistsError) as e:
        fail(str(e))
    except RankFailed as e:
        _rank_failure(e)
    console.print(f"imported {cfg.name} ({'MoE' if cfg.is_moe else 'dense'}) -> {out_dir}")


@checkpoint_app.command("export-hf")
def export_hf(
    ckpt_dir: Path = typer.Argument(..., exists=True, file_okay=False, help="our checkpoint"),
    out_dir: Path = typer.Argument(..., help="new folder for the transformers checkpoint"),
    dtype: str = typer.Option(
        None, help="bfloat16, float16 or float32 (default: the checkpoint's own dtype)"
    ),
    max_shard_gib: float = typer.Option(2.0, help="shard size limit in GiB"),
    workers: int = typer.Option(0, help=WORKERS_HELP),
    layout: str = typer.Option(None, help=LAYOUT_HELP),
) -> None:
    """Write our checkpoint as transformers safetensors (+ config.json) that transformers loads."""
    from upcycle.atomic import IntegrityError
    from upcycle.conversion.group import RankFailed
    from upcycle.dense.hf_weights import CheckpointError

    try:
        ranks = _ranks(workers, layout)
        kw = dict(dtype=dtype and parse_dtype(dtype), max_shard_bytes=int(max_shard_gib * 2**30))
        if ranks is None:
            from upcycle.conversion.hf_interop import export_hf as run

            cfg, written = run(ckpt_dir, out_dir, **kw)
        else:
            from upcycle.conversion.distributed import export_on_ranks
            from upcycle.platform.cluster import ensure_ray

            ensure_ray()
            cfg, written, reports = export_on_ranks(ckpt_dir, out_dir, ranks, workers, **kw)
            _print_ranks(reports)
    except (CheckpointError, ConfigError, IntegrityError, FileExistsError) as e:
        fail(str(e))
    except RankFailed as e:
        _rank_failure(e)
    console.print(f"exported {cfg.name} -> {out_dir} ({str(written).removeprefix('torch.')})")


@app.command()
def convert(
    out_dir: Path = typer.Argument(None, help="new folder for the MoE checkpoint"),
    source: str = typer.Option(
        ..., "--from", help="dense checkpoint, transformers folder, or preset (--dry-run)"
    ),
    target: str = typer.Option(..., "--to", help="MoE preset name or model JSON"),
    method: str = typer.Option("qwen2", help="qwen2 | granular | sparse"),
    seed: int = typer.Option(0),
    reinit_fraction: float = typer.Option(0.5, help="qwen2: share of each expert re-initialised"),
    router_std: float = typer.Option(0.02, help="std of the new router and shared-expert gate"),
    dry_run: bool = typer.Option(False, "--dry-run", help="check shapes on the meta device only"),
    hf: bool = typer.Option(False, "--hf", help="write a transformers Qwen2-MoE folder"),
    dtype: str = typer.Option("bfloat16", help="--hf weights: bfloat16 | float16 | float32"),
    workers: int = typer.Option(0, help=WORKERS_HELP),
    layout: str = typer.Option(None, help=LAYOUT_HELP),
    address: str = typer.Option(None, help=ADDRESS_HELP),
) -> None:
    """Upcycle a dense Qwen2 model into a Qwen2-MoE (qwen2, granular or sparse initialisation)
    as a Ray task, or on --workers ranks that each write their shard; --dry-run checks shapes
    on the meta device instead (with --workers: each rank's reads, memory and writes)."""
    from upcycle.conversion.group import RankFailed
    from upcycle.dense.hf_weights import CheckpointError
    from upcycle.jobs import convert as job
    from upcycle.moe.upcycling import UpcycleSettings
    from upcycle.platform.cluster import ensure_ray

    try:
        settings = UpcycleSettings(method, seed, reinit_fraction, router_std)
        ranks = _ranks(workers, layout)
        if ranks is not None and hf:
            raise ConfigError("hf", "--workers writes our format; then export it with "
                              "`upcycle checkpoint export-hf --workers N --layout ...`")  # fmt: skip
        if dry_run:
            moe, counts = job.dry_run(source, target, settings)
            console.print(
                f"{source} -> {moe.name} ({method}): every shape checks; "
                f"{counts.total_params:,} total / {counts.active_params:,} active parameters"
            )
            if ranks is not None:
                _print_budget(*job.dry_run_on_ranks(source, target, settings, ranks, workers))
            return
        if out_dir is None:
            fail("OUT_DIR is required unless --dry-run")
        job.validate(source, target, out_dir, settings)  # before any cluster time
        if ranks is not None:
            job.check_on_ranks(target, ranks, workers)
        submit_if_remote(address)
        ensure_ray()
        if ranks is not None:
            moe, reports = job.on_ranks(source, target, out_dir, settings, ranks, workers)
            _print_ranks(reports)
        else:
            hf_dtype = parse_dtype(dtype) if hf else None
            moe = job.run_as_ray_task(source, target, out_dir, settings, hf_dtype=hf_dtype)
    except (ConfigError, CheckpointError, FileExistsError) as e:
        fail(str(e))
    except RankFailed as e:
        _rank_failure(e)
    console.print(f"upcycled {source} -> {moe.name} ({method}) at {out_dir}")


def _print_budget(moe: ModelConfig, budget) -> None:
    gib = 2**30
    table = Table(title=f"{moe.name}: per rank (fp32 output)")
    for col in ("rank", "tp", "pp", "ep", "etp", "reads GiB", "holds GiB", "writes GiB"):
        table.add_column(col, justify="right")
    for b in budget:
        c = b.coords
        table.add_row(str(b.rank), str(c.tp_rank), str(c.pp_rank), str(c.ep_rank),
                      str(c.etp_rank), f"{b.reads / gib:.2f}", f"{b.holds / gib:.2f}",
                      f"{b.writes / gib:.2f}")  # fmt: skip
    console.print(table)
    for what in ("reads", "holds", "writes"):
        top = max(budget, key=lambda b: getattr(b, what))
        console.print(f"largest {what}: rank {top.rank}, {getattr(top, what) / gib:.2f} GiB")
    total = sum(b.writes for b in budget)
    console.print(f"written in all: {total / gib:.2f} GiB over {len(budget)} ranks")

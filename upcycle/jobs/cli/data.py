"""`upcycle data prepare` and `data chat-demo`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import typer

from upcycle.config import ConfigError
from upcycle.jobs.cli.common import (
    ADDRESS_HELP,
    console,
    data_app,
    fail,
    submit_if_remote,
)


@data_app.command("prepare")
def data_prepare(
    out_dir: Path = typer.Argument(..., help="new folder for the token shards"),
    sources: list[Path] = typer.Argument(
        None, help="text / JSONL / Parquet files or folders (default: Python's stdlib source)"
    ),
    text_field: str = typer.Option("text", help="JSONL key or Parquet column holding the text"),
    shard_tokens: int = typer.Option(1 << 22, help="tokens per shard"),
    address: str = typer.Option(None, help=ADDRESS_HELP),
) -> None:
    """Tokenize a corpus with Ray Data into Arrow token shards with a manifest."""
    from upcycle.jobs.prepare import demo_corpus, prepare
    from upcycle.platform.cluster import ensure_ray

    submit_if_remote(address)
    ensure_ray()
    try:
        meta = prepare(
            sources or demo_corpus(), out_dir, text_field=text_field, shard_tokens=shard_tokens
        )
    except (ConfigError, FileExistsError) as e:
        fail(str(e))
    console.print(
        f"{meta['documents']:,} documents -> {meta['num_tokens']:,} tokens in "
        f"{len(meta['shards'])} shard(s) at {out_dir}"
    )


@data_app.command("chat-demo")
def data_chat_demo(
    out_dir: Path = typer.Argument(..., help="new folder for sft.jsonl and dpo.jsonl"),
    seed: int = typer.Option(0, help="which wrong answers become DPO's rejected replies"),
) -> None:
    """Post-training demo data from the Python standard library's docstrings (no download):
    SFT conversations and DPO pairs about its functions."""
    from upcycle.jobs.chat_demo import write

    try:
        sft_path, dpo_path = write(out_dir, seed)
    except FileExistsError as e:
        fail(str(e))
    n = len(sft_path.read_text().splitlines())
    console.print(f"{n} conversations -> {sft_path}; {n} preference pairs -> {dpo_path}")


def _curate(address: str | None, out_dir: Path, job: Callable[[], dict],
            detail: Callable[[dict], str]) -> None:  # fmt: skip
    """Submit (with --address) or start Ray, run one curation job (upcycle.jobs.curate), print
    documents in -> out with `detail` of its report."""
    from upcycle.platform.cluster import ensure_ray

    try:
        submit_if_remote(address)
        ensure_ray()
        report = job()
    except (ConfigError, ValueError, FileExistsError) as e:
        fail(str(e))
    console.print(
        f"{report['documents_in']:,} documents -> {report['documents_out']:,} "
        f"({detail(report)}) in {report['seconds']:.1f} s -> {out_dir}"
    )


@data_app.command("filter")
def data_filter(
    out_dir: Path = typer.Argument(..., help="new folder: documents.jsonl, report.json"),
    sources: list[Path] = typer.Argument(..., help="text / JSONL / Parquet files or folders"),
    recipe: Path = typer.Option(..., help="YAML: filters: {RULE: {min: X, max: Y}, ...}"),
    text_field: str = typer.Option("text", help="JSONL key or Parquet column holding the text"),
    workers: int = typer.Option(1, help="Ray Data workers measuring documents"),
    address: str = typer.Option(None, help=ADDRESS_HELP),
) -> None:
    """Drop documents that a heuristic quality rule rejects (Gopher's prose rules, StarCoder's
    code rules); report.json gives each dropped document's reason. One MLflow run."""
    from upcycle.curation.filters import Recipe
    from upcycle.jobs.curate import run_filter

    try:
        rules = Recipe.load(recipe)  # a bad recipe fails before Ray starts
    except ConfigError as e:
        fail(str(e))
    _curate(
        address,
        out_dir,
        lambda: run_filter(sources, out_dir, recipe=rules, text_field=text_field, workers=workers),
        lambda r: "dropped: " + (", ".join(f"{k} {v}" for k, v in r["dropped_by_rule"].items())
                                 or "none"),
    )  # fmt: skip


@data_app.command("dedup")
def data_dedup(
    out_dir: Path = typer.Argument(..., help="new folder: documents.jsonl, report.json"),
    sources: list[Path] = typer.Argument(..., help="text / JSONL / Parquet files or folders"),
    text_field: str = typer.Option("text", help="JSONL key or Parquet column holding the text"),
    threshold: float = typer.Option(0.7, help="estimated Jaccard of word 5-grams that joins"),
    workers: int = typer.Option(1, help="Ray Data workers computing signatures"),
    address: str = typer.Option(None, help=ADDRESS_HELP),
) -> None:
    """Drop exact and near-duplicate documents (MinHash LSH on Ray Data); each cluster keeps
    its first document. One MLflow run."""
    from upcycle.jobs.curate import run_dedup

    _curate(
        address,
        out_dir,
        lambda: run_dedup(sources, out_dir, text_field=text_field, threshold=threshold,
                          workers=workers),
        lambda r: f"{r['dropped']:,} duplicates in {len(r['clusters']):,} clusters",
    )  # fmt: skip


@data_app.command("decontaminate")
def data_decontaminate(
    out_dir: Path = typer.Argument(..., help="new folder: documents.jsonl, report.json"),
    sources: list[Path] = typer.Argument(..., help="text / JSONL / Parquet files or folders"),
    against: list[str] = typer.Option(
        ..., help="evaluation set: humaneval, a folder or text file (an item per file), JSONL"
    ),
    ngram: int = typer.Option(13, help="words per n-gram (after normalisation)"),
    text_field: str = typer.Option("text", help="JSONL key or Parquet column holding the text"),
    workers: int = typer.Option(1, help="Ray Data workers checking documents"),
    address: str = typer.Option(None, help=ADDRESS_HELP),
) -> None:
    """Drop documents that share an n-gram with an evaluation set; report.json lists the hits
    per set and item. One MLflow run."""
    from upcycle.jobs.curate import run_decontaminate

    def hits(r: dict) -> str:
        found = ", ".join(f"{name}: {len(items)} items" for name, items in r["hits"].items())
        return f"{r['dropped']:,} contaminated; {found or 'no hits'}"

    _curate(
        address,
        out_dir,
        lambda: run_decontaminate(sources, out_dir, against=against, ngram=ngram,
                                  text_field=text_field, workers=workers),
        hits,
    )  # fmt: skip

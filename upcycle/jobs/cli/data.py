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
        fail(e)
    console.print(
        f"{report['documents_in']:,} documents -> {report['documents_out']:,} "
        f"({detail(report)}) in {report['seconds']:.1f} s -> {out_dir}"
    )


def _recipe(path: Path | None):
    """The recipe at PATH (a bad one fails before Ray starts), or an empty one."""
    from upcycle.curation.recipe import Recipe

    try:
        return Recipe.load(path) if path else Recipe()
    except ConfigError as e:
        fail(str(e))


RECIPE_HELP = "YAML curation recipe (examples/curation/stdlib-code.yaml)"
SOURCES = typer.Argument(..., help="text / JSONL / Parquet files or folders")
OUT = typer.Argument(..., help="new folder: documents.jsonl, report.json")
TEXT_FIELD = typer.Option("text", help="JSONL key or Parquet column holding the text")


@data_app.command("filter")
def data_filter(
    out_dir: Path = OUT,
    sources: list[Path] = SOURCES,
    recipe: Path = typer.Option(..., help=f"{RECIPE_HELP}: its filters section"),
    text_field: str = TEXT_FIELD,
    workers: int = typer.Option(1, help="Ray Data workers measuring (and model-scoring) documents"),
    address: str = typer.Option(None, help=ADDRESS_HELP),
) -> None:
    """Drop documents that a quality rule rejects: Gopher's prose rules, StarCoder's code rules,
    perplexity under a reference model, a reward model's score; report.json gives each dropped
    document's reason. One MLflow run."""
    from upcycle.jobs.curate import run_filter

    rules = _recipe(recipe)
    _curate(
        address,
        out_dir,
        lambda: run_filter(sources, out_dir, recipe=rules, text_field=text_field, workers=workers),
        lambda r: "dropped: " + (", ".join(f"{k} {v}" for k, v in r["dropped_by_rule"].items())
                                 or "none"),
    )  # fmt: skip


@data_app.command("dedup")
def data_dedup(
    out_dir: Path = OUT,
    sources: list[Path] = SOURCES,
    threshold: float = typer.Option(
        None, help="estimated Jaccard of word 5-grams that joins [default: the recipe's, or 0.7]"
    ),
    recipe: Path = typer.Option(None, help=f"{RECIPE_HELP}: its dedup section"),
    text_field: str = TEXT_FIELD,
    workers: int = typer.Option(1, help="Ray Data workers computing signatures"),
    address: str = typer.Option(None, help=ADDRESS_HELP),
) -> None:
    """Drop exact and near-duplicate documents (MinHash LSH on Ray Data); each cluster keeps
    its first document. One MLflow run."""
    from upcycle.curation.recipe import Dedup
    from upcycle.jobs.curate import run_dedup

    if threshold is None:
        threshold = (_recipe(recipe).dedup or Dedup()).threshold
    _curate(
        address,
        out_dir,
        lambda: run_dedup(sources, out_dir, text_field=text_field, threshold=threshold,
                          workers=workers),
        lambda r: f"{r['dropped']:,} duplicates in {len(r['clusters']):,} clusters",
    )  # fmt: skip


@data_app.command("decontaminate")
def data_decontaminate(
    out_dir: Path = OUT,
    sources: list[Path] = SOURCES,
    against: list[str] = typer.Option(
        None,
        help="evaluation set: humaneval, a folder or text file (an item per file), JSONL "
        "[default: the recipe's]",
    ),
    ngram: int = typer.Option(None, help="words per n-gram [default: the recipe's, or 13]"),
    recipe: Path = typer.Option(None, help=f"{RECIPE_HELP}: its decontaminate section"),
    text_field: str = typer.Option(
        "text",
        help="JSONL key or Parquet column holding the text: `messages` or `prompt` "
        "for SFT / DPO / RLHF files (every message's content)",
    ),
    workers: int = typer.Option(1, help="Ray Data workers checking documents"),
    address: str = typer.Option(None, help=ADDRESS_HELP),
) -> None:
    """Drop documents (or SFT / DPO / RLHF records) that share an n-gram with an evaluation
    set; report.json lists the hits per set and item. One MLflow run."""
    from upcycle.curation.decontaminate import check_sets
    from upcycle.jobs.curate import run_decontaminate

    section = _recipe(recipe).decontaminate
    against = against or (list(section.against) if section else [])
    if ngram is None:
        ngram = section.ngram if section else 13
    try:
        check_sets(against)  # before Ray starts
    except ConfigError as e:
        fail(str(e))

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


@data_app.command("curate")
def data_curate(
    out_dir: Path = typer.Argument(..., help="new folder: a folder per step"),
    sources: list[Path] = SOURCES,
    recipe: Path = typer.Option(..., help=f"{RECIPE_HELP}: filters, dedup, decontaminate"),
    text_field: str = TEXT_FIELD,
    workers: int = typer.Option(1, help="Ray Data workers"),
    address: str = typer.Option(None, help=ADDRESS_HELP),
) -> None:
    """Run a recipe's sections in order (filter -> dedup -> decontaminate), each step reading
    the last one's documents into OUT/STEP; run again, it continues where it stopped. One MLflow
    run per step."""
    from upcycle.jobs.curate import run_curate
    from upcycle.platform.cluster import ensure_ray

    rules = _recipe(recipe)
    try:
        submit_if_remote(address)
        ensure_ray()
        steps = run_curate(sources, out_dir, recipe=rules, text_field=text_field,
                           workers=workers)  # fmt: skip
    except (ConfigError, ValueError, FileExistsError) as e:
        fail(str(e))
    counts = " -> ".join(f"{step} {r['documents_out']:,}" for step, r in steps)
    console.print(f"{steps[0][1]['documents_in']:,} documents -> {counts} -> "
                  f"{out_dir / steps[-1][0] / 'documents.jsonl'}")  # fmt: skip

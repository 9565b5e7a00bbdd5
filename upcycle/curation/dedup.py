"""Exact and near-duplicate removal across a whole corpus, on Ray Data.

Near duplicates are found by MinHash LSH, the method of datatrove's and NeMo Curator's
deduplication: each document's word 5-grams (after `documents.words`) go into a 128-permutation
MinHash (datasketch computes it); the signature is cut into 16 bands of 8 rows, and two
documents whose band hashes agree in any band become a candidate pair. A candidate pair is
kept as an edge when the share of equal signature rows (the estimated Jaccard similarity of
their 5-gram sets) reaches `threshold`. Exact duplicates (the same normalised words) are edges
too. Edges join documents into clusters (union-find on the driver: one edge per duplicate, far
fewer than documents), and each cluster keeps its smallest id (`documents.id_order`), so the
result does not depend on the number of workers or the order of the input files.

With 16 bands of 8 rows, a pair of Jaccard 0.8 becomes a candidate with probability
1 - (1 - 0.8^8)^16 = 0.95, one of 0.5 with 0.06, and its estimate (std ~0.04 at 128
permutations) must still reach the threshold (default 0.7). Signatures, band grouping and
the pairwise checks run as Ray Data operators; only the edges come back to the driver.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import ray

from upcycle.curation.documents import id_order, kept_in_id_order, words

NUM_PERM, BANDS, ROWS = 128, 16, 8
SHINGLE = 5  # words per shingle
SEED = 1


@dataclass
class DedupResult:
    kept: ray.data.Dataset  # rows of documents.COLUMNS, in id order
    clusters: list[dict] = field(default_factory=list)  # {kept, dropped: [{id, jaccard}]}

    @property
    def dropped(self) -> int:
        return sum(len(c["dropped"]) for c in self.clusters)


def _signatures(batch: dict) -> dict:
    from datasketch import MinHash

    sigs, exact = [], []
    for text in batch["text"]:
        tokens = words(text)
        shingles = {
            " ".join(tokens[i : i + SHINGLE]).encode()
            for i in range(max(1, len(tokens) - SHINGLE + 1))
        }
        m = MinHash(num_perm=NUM_PERM, seed=SEED)
        m.update_batch(list(shingles))
        sigs.append(m.hashvalues.astype(np.uint64))
        exact.append(hashlib.sha1(" ".join(tokens).encode()).hexdigest())
    return {"id": batch["id"], "exact": np.array(exact), "sig": np.stack(sigs)}


def _band_rows(row: dict) -> list[dict]:
    sig = np.asarray(row["sig"], dtype=np.uint64)
    keys = [f"x{row['exact']}"]  # the exact hash is a band every exact copy shares
    for b in range(BANDS):
        band = sig[b * ROWS : (b + 1) * ROWS].tobytes()
        keys.append(f"{b}:{hashlib.blake2b(band, digest_size=8).hexdigest()}")
    return [{"key": k, "id": row["id"], "sig": sig} for k in keys]


def _group_edges(group: dict, threshold: float) -> dict:
    """The edges of one band bucket: its smallest id to every other member whose estimated
    Jaccard with it reaches `threshold` (exact buckets: every member, Jaccard 1)."""
    ids = list(group["id"])
    if len(ids) < 2:
        return {"a": np.array([], dtype=object), "b": np.array([], dtype=object),
                "jaccard": np.array([], dtype=np.float64)}  # fmt: skip
    order = sorted(range(len(ids)), key=lambda i: id_order(ids[i]))
    first, sigs = order[0], np.stack(group["sig"])
    exact = str(group["key"][0]).startswith("x")
    a, b, jac = [], [], []
    for i in order[1:]:
        j = 1.0 if exact else float(np.mean(sigs[i] == sigs[first]))
        if j >= threshold:
            a.append(ids[first])
            b.append(ids[i])
            jac.append(j)
    return {"a": np.array(a, dtype=object), "b": np.array(b, dtype=object),
            "jaccard": np.array(jac, dtype=np.float64)}  # fmt: skip


def deduplicate(docs: ray.data.Dataset, *, threshold: float = 0.7, workers: int = 1) -> DedupResult:
    """Documents `docs` (rows of documents.COLUMNS, materialized: `documents.read_documents`)
    without exact or near duplicates; run it inside `documents.sort_shuffle()`."""
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold: must be in (0, 1], got {threshold}")
    sigs = docs.map_batches(
        _signatures, batch_size=64, compute=ray.data.TaskPoolStrategy(size=workers)
    )
    rows = (
        sigs.flat_map(_band_rows)
        .groupby("key", num_partitions=max(1, workers))  # Ray's default, 200, idles here
        .map_groups(_group_edges, fn_kwargs={"threshold": threshold}, batch_format="numpy")
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

"""`upcycle data filter`, `data dedup` and `data decontaminate`: every check (sources, recipe,
evaluation sets, output folder, settings) before any Ray Data work, the work
(upcycle.curation), the output folder (documents.jsonl for `data prepare`, report.json; whole
or not at all) and one MLflow run with documents in and out, what was dropped and why, and the
inputs' paths as lineage."""

from __future__ import annotations

import json
import tempfile
import time
from collections import Counter
from pathlib import Path

from upcycle.atomic import atomic_directory
from upcycle.curation.documents import DOCUMENTS, expand_sources, read_documents, write_documents
from upcycle.curation.filters import Recipe
from upcycle.platform.tracking import RunTracker, default_tracking_uri

REPORT = "report.json"


def _check_out(out: Path, workers: int) -> None:
    if workers < 1:
        raise ValueError(f"workers: must be >= 1, got {workers}")
    if Path(out).exists() and any(Path(out).iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose a new output folder")


def _finish(out: Path, kept: list[dict], report: dict) -> dict:
    with atomic_directory(out) as tmp:
        report["documents_out"] = write_documents(kept, tmp / DOCUMENTS)
        (tmp / REPORT).write_text(json.dumps(report, indent=1) + "\n")
    return report


def _track(job: str, out: Path, params: dict, metrics: dict, tracking_uri: str | None,
           run_name: str | None) -> None:  # fmt: skip
    tracker = RunTracker(
        Path(tempfile.mkdtemp(prefix=f"upcycle-{job}-")),
        tracking_uri=tracking_uri or default_tracking_uri(),
        experiment="upcycle",
        run_name=run_name or f"{job}-{Path(out).name}",
    )
    tracker.log_params({**params, "out": Path(out).absolute()})
    tracker.set_tags({"kind": "curation"})
    tracker.log_metrics(0, metrics)
    tracker.log_artifact(Path(out) / REPORT)
    tracker.close()


def run_filter(sources: list[Path], out: Path, *, recipe: Recipe, text_field: str = "text",
               workers: int = 1, tracking_uri: str | None = None,
               run_name: str | None = None) -> dict:  # fmt: skip
    """Drop documents a heuristic rule of `recipe` rejects (upcycle.curation.filters); the
    report: counts per rule and every dropped document with its reason."""
    from upcycle.curation.filters import apply

    _check_out(out, workers)
    files = expand_sources(sources)
    began = time.perf_counter()
    docs = read_documents(files, text_field, workers)
    documents_in = docs.count()
    kept, dropped = apply(docs, recipe, workers=workers)
    per_rule = Counter(reason.split(" ", 1)[0] for reason in dropped.values())
    report = {"documents_in": documents_in, "dropped": len(dropped),
              "dropped_by_rule": dict(sorted(per_rule.items())),
              "recipe": {b.rule: {k: v for k, v in (("min", b.min), ("max", b.max))
                                  if v is not None} for b in recipe.bounds},
              "dropped_documents": [{"id": k, "reason": v} for k, v in sorted(dropped.items())]}  # fmt: skip
    report = _finish(out, kept, report)
    seconds = time.perf_counter() - began
    _track("filter", out, {"sources": [str(f) for f in files][:100], "files": len(files),
                           "recipe": json.dumps(report["recipe"]), "workers": workers},
           {"documents_in": documents_in, "documents_out": report["documents_out"],
            "dropped": len(dropped), "documents_per_s": documents_in / seconds,
            **{f"dropped/{rule}": n for rule, n in per_rule.items()}},
           tracking_uri, run_name)  # fmt: skip
    return report | {"seconds": seconds}


def run_dedup(sources: list[Path], out: Path, *, text_field: str = "text",
              threshold: float = 0.7, workers: int = 1, tracking_uri: str | None = None,
              run_name: str | None = None) -> dict:  # fmt: skip
    """Drop exact and near duplicates (upcycle.curation.dedup); the report."""
    from upcycle.curation.dedup import deduplicate

    _check_out(out, workers)
    files = expand_sources(sources)
    began = time.perf_counter()
    docs = read_documents(files, text_field, workers)
    documents_in = docs.count()
    result = deduplicate(docs, threshold=threshold, workers=workers)
    report = {"documents_in": documents_in, "dropped": result.dropped,
              "clusters": result.clusters}  # fmt: skip
    report = _finish(out, result.kept, report)
    seconds = time.perf_counter() - began
    _track("dedup", out, {"sources": [str(f) for f in files][:100], "files": len(files),
                          "threshold": threshold, "workers": workers},
           {"documents_in": documents_in, "documents_out": report["documents_out"],
            "dropped_duplicates": result.dropped, "clusters": len(result.clusters),
            "documents_per_s": documents_in / seconds}, tracking_uri, run_name)  # fmt: skip
    return report | {"seconds": seconds}


def run_decontaminate(sources: list[Path], out: Path, *, against: list[str], ngram: int = 13,
                      text_field: str = "text", workers: int = 1,
                      tracking_uri: str | None = None, run_name: str | None = None) -> dict:  # fmt: skip
    """Drop documents sharing an `ngram`-word n-gram with an evaluation set; the report."""
    from upcycle.config import ConfigError
    from upcycle.curation.decontaminate import Index, decontaminate

    _check_out(out, workers)
    if not against:
        raise ConfigError("against", "name at least one evaluation set (humaneval, a folder, "
                          "a text or JSONL file)")  # fmt: skip
    files = expand_sources(sources)
    index = Index.build(against, ngram)  # a missing evaluation set fails here, before the work
    began = time.perf_counter()
    docs = read_documents(files, text_field, workers)
    documents_in = docs.count()
    result = decontaminate(docs, index, workers=workers)
    report = {"documents_in": documents_in, "dropped": result.dropped, "ngram": ngram,
              "hits": result.report}  # fmt: skip
    report = _finish(out, result.kept, report)
    seconds = time.perf_counter() - began
    metrics = {"documents_in": documents_in, "documents_out": report["documents_out"],
               "dropped_contaminated": result.dropped, "documents_per_s": documents_in / seconds,
               **{f"items_hit/{Path(k).name}": len(v) for k, v in result.report.items()}}  # fmt: skip
    _track("decontaminate", out, {"sources": [str(f) for f in files][:100], "files": len(files),
                                  "against": against, "ngram": ngram, "workers": workers},
           metrics, tracking_uri, run_name)  # fmt: skip
    return report | {"seconds": seconds}

"""`upcycle data filter`, `data dedup` and `data decontaminate`: every check (sources, recipe,
evaluation sets, output folder, settings) before any Ray Data work, the work
(upcycle.curation: only ids, reasons and scores come to the driver), the output folder
(documents.jsonl for `data prepare`, streamed in id order from Ray Data's sort; report.json;
whole or not at all) and one MLflow run with documents in and out, what was dropped and why,
and the inputs' paths as lineage."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import numpy as np

from upcycle.atomic import atomic_directory
from upcycle.curation.documents import (
    DOCUMENTS,
    expand_sources,
    kept_in_id_order,
    kind,
    read_documents,
    sort_shuffle,
    write_documents,
)
from upcycle.curation.recipe import Recipe
from upcycle.platform.tracking import track_job

REPORT = "report.json"


def _check_out(out: Path, workers: int) -> None:
    if workers < 1:
        raise ValueError(f"workers: must be >= 1, got {workers}")
    if Path(out).exists() and not Path(out).is_dir():
        raise FileExistsError(f"{out} is a file; the output is a folder: choose a new one")
    if Path(out).exists() and any(Path(out).iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose a new output folder")


def _read(files: list[Path], text_field: str, workers: int):
    """The documents (materialized) and the report's first counts."""
    docs = read_documents(files, text_field, workers)
    # over the materialized blocks: Dataset.sum would plan and run an aggregation (~2 s)
    tokens = sum(int(b["tokens"].sum()) for b in docs.iter_batches(batch_size=None))
    return docs, {"documents_in": docs.count(), "tokens_in": tokens}


def _finish(out: Path, kept, report: dict) -> dict:
    """Write OUT, whole: documents.jsonl streamed from the Ray Dataset `kept` in its order, and
    report.json; the report with the output counts."""
    with atomic_directory(out) as tmp:
        report |= write_documents(kept.iter_rows(), tmp / DOCUMENTS)
        (tmp / REPORT).write_text(json.dumps(report, indent=1) + "\n")
    return report


def _counts(report: dict, seconds: float) -> dict:
    """The metrics every curation run logs."""
    keys = ("documents_in", "documents_out", "tokens_in", "tokens_out")
    return {**{k: report[k] for k in keys}, "documents_per_s": report["documents_in"] / seconds}


def _track(job: str, files: list[Path], out: Path, params: dict, metrics: dict,
           tracking_uri: str | None, run_name: str | None) -> None:  # fmt: skip
    """The job's MLflow run: the input files as its dataset input (lineage) and params."""
    track_job("curation", run_name or f"{job}-{Path(out).name}",
              params={"sources": [str(f) for f in files][:100], "files": len(files), **params,
                      "out": Path(out).absolute()},
              metrics=metrics, inputs=files, artifacts=[Path(out) / REPORT],
              tracking_uri=tracking_uri)  # fmt: skip


def _filter_report(recipe: Recipe, dropped: dict[str, str], scores: dict[str, list]) -> dict:
    """Counts per rule, every dropped document with its reason, the model rules' quantiles."""
    per_rule = Counter(reason.split(" ", 1)[0] for reason in dropped.values())
    quantiles = {rule: dict(zip(("p10", "median", "p90"), np.quantile(v, [0.1, 0.5, 0.9]).tolist(),
                                strict=True)) for rule, v in scores.items() if v}  # fmt: skip
    return {"dropped": len(dropped), "dropped_by_rule": dict(sorted(per_rule.items())),
            "recipe": recipe.as_dict()["filters"], "scores": quantiles,
            "dropped_documents": [{"id": k, "reason": v} for k, v in sorted(dropped.items())]}  # fmt: skip


def run_filter(sources: list[Path], out: Path, *, recipe: Recipe, text_field: str = "text",
               workers: int = 1, tracking_uri: str | None = None,
               run_name: str | None = None) -> dict:  # fmt: skip
    """Drop documents a rule of `recipe`'s filters section rejects (upcycle.curation.filters,
    .model_scores); the report: counts per rule, every dropped document with its reason, and
    the model rules' score quantiles."""
    from upcycle.config import ConfigError
    from upcycle.curation.filters import apply

    _check_out(out, workers)
    if not recipe.filters:
        raise ConfigError("filters", "the recipe has no filters section; add one or run "
                          "`data dedup` / `data decontaminate`")  # fmt: skip
    files = expand_sources(sources)
    checkpoints = {m.rule: m.checkpoint() for m in recipe.models}  # a bad model fails here
    began = time.perf_counter()
    with sort_shuffle():
        docs, counts = _read(files, text_field, workers)
        dropped, scores = apply(docs, recipe, checkpoints, workers=workers)
        report = _finish(out, kept_in_id_order(docs, dropped),
                         counts | _filter_report(recipe, dropped, scores))  # fmt: skip
    seconds = time.perf_counter() - began
    _track("filter", files, out, {"recipe": json.dumps(report["recipe"]), "workers": workers},
           {**_counts(report, seconds), "dropped": len(dropped),
            **{f"dropped/{rule}": n for rule, n in report["dropped_by_rule"].items()},
            **{f"{rule}/{q}": v for rule, qs in report["scores"].items() for q, v in qs.items()}},
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
    with sort_shuffle():
        docs, counts = _read(files, text_field, workers)
        result = deduplicate(docs, threshold=threshold, workers=workers)
        report = {**counts, "dropped": result.dropped, "clusters": result.clusters}
        report = _finish(out, result.kept, report)
    seconds = time.perf_counter() - began
    _track("dedup", files, out, {"threshold": threshold, "workers": workers},
           {**_counts(report, seconds), "dropped_duplicates": result.dropped,
            "clusters": len(result.clusters)}, tracking_uri, run_name)  # fmt: skip
    return report | {"seconds": seconds}


def run_decontaminate(sources: list[Path], out: Path, *, against: list[str], ngram: int = 13,
                      text_field: str = "text", workers: int = 1,
                      tracking_uri: str | None = None, run_name: str | None = None) -> dict:  # fmt: skip
    """Drop documents sharing an `ngram`-word n-gram with an evaluation set; the report."""
    from upcycle.curation.decontaminate import Index, check_sets, decontaminate

    _check_out(out, workers)
    check_sets(against)
    files = expand_sources(sources)
    index = Index.build(against, ngram)  # a missing evaluation set fails here, before the work
    began = time.perf_counter()
    with sort_shuffle():
        docs, counts = _read(files, text_field, workers)
        result = decontaminate(docs, index, workers=workers)
        report = {**counts, "dropped": result.dropped, "ngram": ngram, "hits": result.report}
        report = _finish(out, result.kept, report)
    seconds = time.perf_counter() - began
    metrics = {**_counts(report, seconds), "dropped_contaminated": result.dropped,
               **{f"items_hit/{Path(k).name}": len(v) for k, v in result.report.items()}}  # fmt: skip
    _track("decontaminate", files, out, {"against": against, "ngram": ngram, "workers": workers},
           metrics, tracking_uri, run_name)  # fmt: skip
    return report | {"seconds": seconds}


STEPS = ("filter", "dedup", "decontaminate")  # the order `data curate` runs a recipe's sections


def run_curate(sources: list[Path], out: Path, *, recipe: Recipe, text_field: str = "text",
               workers: int = 1, tracking_uri: str | None = None,
               run_name: str = "curate") -> list[tuple[str, dict]]:  # fmt: skip
    """The recipe's sections in STEPS order, each job into OUT/STEP reading the last one's
    documents (the final ones: OUT/STEP/documents.jsonl of the last step); MLflow runs
    `{run_name}-{step}`. Every check (sections, models, evaluation sets, sources) comes first;
    a step whose folder is already finished and verified is not run again (a stopped curation
    resumes). Returns (step, report) pairs."""
    from upcycle.atomic import IntegrityError, verify_manifest
    from upcycle.config import ConfigError
    from upcycle.curation.decontaminate import check_sets

    present = [s for s, on in zip(STEPS, (recipe.filters, recipe.dedup, recipe.decontaminate),
                                  strict=True) if on]  # fmt: skip
    if not present:
        raise ConfigError("recipe", f"has none of the sections {list(STEPS)}")
    if workers < 1:
        raise ValueError(f"workers: must be >= 1, got {workers}")
    for m in recipe.models:
        m.checkpoint()
    if recipe.decontaminate:
        check_sets(list(recipe.decontaminate.against))
    # a text file is written on as {"text", "source"}; a record keeps its fields
    text_after = "text" if kind(expand_sources(sources)[0]) == "text" else text_field
    track = {"text_field": text_field, "workers": workers, "tracking_uri": tracking_uri}
    jobs = {
        "filter": lambda src, to: run_filter(src, to, recipe=recipe, run_name=f"{run_name}-filter",
                                             **track),
        "dedup": lambda src, to: run_dedup(src, to, threshold=recipe.dedup.threshold,
                                           run_name=f"{run_name}-dedup", **track),
        "decontaminate": lambda src, to: run_decontaminate(
            src, to, against=list(recipe.decontaminate.against), ngram=recipe.decontaminate.ngram,
            run_name=f"{run_name}-decontaminate", **track),
    }  # fmt: skip
    done = []
    for step in present:
        folder = Path(out) / step
        try:
            verify_manifest(folder)
        except (IntegrityError, OSError):
            jobs[step](sources, folder)
        done.append((step, json.loads((folder / REPORT).read_text())))
        sources, track["text_field"] = [folder / DOCUMENTS], text_after
    return done

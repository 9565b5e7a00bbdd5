"""`upcycle synthesize evolve`, `constitutional` and `repurpose`: post-training data a model
writes on the generation engine's Ray Data pool (upcycle.synthesis.evolve, .constitutional,
.repurpose). Every check (settings, templates or principles, the input, the model and engine,
the output folder) comes before any actor starts; the output folder appears whole (its JSONL
files and report.json: counts, and every dropped item with its reason), with one MLflow run
(kind `synthesis`: inputs, outputs, drops per reason, the input and model as lineage)."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

from upcycle.atomic import atomic_directory
from upcycle.platform.tracking import track_job
from upcycle.synthesis.generation import GenerateSpec
from upcycle.synthesis.writer import Lengths, Writer, instruction_of
from upcycle.training.chat_data import read_jsonl

REPORT = "report.json"
DEFAULT_LENGTHS = Lengths()


def _writer(model: str, spec: GenerateSpec, lengths: Lengths, out: Path, *, workers: int,
            engine: dict) -> Writer:  # fmt: skip
    lengths.check()
    if Path(out).exists() and any(Path(out).iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose a new output folder")
    return Writer.load(model, spec, workers=workers, engine=engine)


def read_instructions(path: Path) -> list[tuple[int, str]]:
    """(line, instruction) of a JSONL file of prompts or conversations (writer.instruction_of)."""
    return [(n, instruction_of(r, f"{path}:{n}")) for n, r in read_jsonl(Path(path))]


def _finish(job: str, out: Path, files: dict[str, list[dict]], dropped: list[dict],
            inputs: int, read: list[Path], params: dict, seconds: float,
            tracking_uri: str | None, run_name: str | None) -> dict:  # fmt: skip
    """Write OUT (files, report.json), track the run (`read`: the files the job read, its
    lineage); the report."""
    reasons = Counter(d["reason"].split(":")[0] for d in dropped)
    report = {"inputs": inputs, **{name.split(".")[0]: len(rows) for name, rows in files.items()},
              "dropped": len(dropped), "dropped_by_reason": dict(sorted(reasons.items())),
              "dropped_items": dropped, "seconds": seconds}  # fmt: skip
    with atomic_directory(Path(out)) as tmp:
        for name, rows in files.items():
            (tmp / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        (tmp / REPORT).write_text(json.dumps(report, indent=1) + "\n")
    counts = {k: v for k, v in report.items() if isinstance(v, int | float)}
    track_job("synthesis", run_name or f"{job}-{Path(out).name}",
              params={**params, "out": Path(out).absolute()},
              metrics={**counts, **{f"dropped/{k}": n for k, n in reasons.items()}},
              inputs=read, artifacts=[Path(out) / REPORT], tracking_uri=tracking_uri)  # fmt: skip
    return report


def _params(writer: Writer, inputs: list[Path], lengths: Lengths) -> dict:
    return {"model": writer.ckpt, "input": [str(Path(p).absolute()) for p in inputs][:100],
            "workers": writer.workers,
            **{f"sampling.{k}": v for k, v in vars(writer.spec).items() if k != "stop"},
            "max_model_len": writer.runner["max_model_len"], **vars(lengths)}  # fmt: skip


def run_evolve(model: str, instructions: Path, out: Path, *, spec: GenerateSpec,
               templates: Path | None = None, rounds: int = 1, lengths: Lengths = DEFAULT_LENGTHS,
               workers: int = 1, engine: dict | None = None, tracking_uri: str | None = None,
               run_name: str | None = None) -> dict:  # fmt: skip
    """OUT/prompts.jsonl: evolved instructions (upcycle.synthesis.evolve)."""
    from upcycle.platform.cluster import ensure_ray
    from upcycle.synthesis.evolve import evolve, load_templates

    if rounds < 1:
        raise ValueError(f"rounds: must be >= 1, got {rounds}")
    chosen = load_templates(templates)
    writer = _writer(model, spec, lengths, out, workers=workers, engine=engine or {})
    items = read_instructions(instructions)
    ensure_ray()
    began = time.perf_counter()
    done = evolve(writer, items, chosen, rounds=rounds, lengths=lengths, seed=spec.seed)
    params = {**_params(writer, [instructions], lengths), "rounds": rounds,
              "templates": str(templates) if templates else "default",
              "template_names": sorted(chosen)}  # fmt: skip
    return _finish("evolve", out, {"prompts.jsonl": done.kept}, done.dropped, done.inputs,
                   [Path(instructions)], params, time.perf_counter() - began, tracking_uri,
                   run_name)  # fmt: skip


def run_constitutional(model: str, instructions: Path, out: Path, *, principles: Path,
                       spec: GenerateSpec, revise: bool = False, lengths: Lengths = DEFAULT_LENGTHS,
                       workers: int = 1, engine: dict | None = None,
                       tracking_uri: str | None = None, run_name: str | None = None) -> dict:  # fmt: skip
    """OUT/sft.jsonl and dpo.jsonl: replies that follow and break the principles
    (upcycle.synthesis.constitutional)."""
    from upcycle.platform.cluster import ensure_ray
    from upcycle.synthesis.constitutional import constitutional, load_principles

    rules = load_principles(principles)
    writer = _writer(model, spec, lengths, out, workers=workers, engine=engine or {})
    items = read_instructions(instructions)
    ensure_ray()
    began = time.perf_counter()
    done = constitutional(writer, items, rules, lengths=lengths, revise=revise)
    params = {**_params(writer, [instructions], lengths), "principles": Path(principles).absolute(),
              "revise": revise}  # fmt: skip
    return _finish("constitutional", out, {"sft.jsonl": done.sft, "dpo.jsonl": done.dpo},
                   done.dropped, done.inputs, [Path(instructions), Path(principles)], params,
                   time.perf_counter() - began, tracking_uri, run_name)  # fmt: skip


def run_repurpose(model: str, sources: list[Path], out: Path, *, spec: GenerateSpec,
                  text_field: str = "text", passage_tokens: int | None = None,
                  lengths: Lengths = DEFAULT_LENGTHS, workers: int = 1,
                  engine: dict | None = None, tracking_uri: str | None = None,
                  run_name: str | None = None) -> dict:  # fmt: skip
    """OUT/sft.jsonl: an instruction written for each passage of each text, the passage its
    response (upcycle.synthesis.repurpose). `passage_tokens` None: what the context holds
    beside the template and `max_tokens`."""
    from upcycle.curation.documents import expand_sources, id_order, read_documents
    from upcycle.platform.cluster import ensure_ray
    from upcycle.synthesis.repurpose import TEMPLATE, repurpose

    files = expand_sources(sources)
    writer = _writer(model, spec, lengths, out, workers=workers, engine=engine or {})
    if passage_tokens is None:
        from upcycle.synthesis.generation import prompt_ids

        template = len(prompt_ids({"prompt": [{"role": "user", "content": TEMPLATE}]}))
        passage_tokens = writer.runner["max_model_len"] - spec.max_tokens - template
    if passage_tokens < 1:
        raise ValueError(f"passage_tokens: must be >= 1, got {passage_tokens} (the context "
                         "holds no passage beside the template and max_tokens)")  # fmt: skip
    ensure_ray()
    began = time.perf_counter()
    rows = sorted(read_documents(files, text_field).take_all(), key=lambda r: id_order(r["id"]))
    done = repurpose(writer, [(r["id"], r["text"]) for r in rows], lengths=lengths,
                     passage_tokens=passage_tokens)  # fmt: skip
    params = {**_params(writer, files, lengths), "files": len(files), "text_field": text_field,
              "passage_tokens": passage_tokens}  # fmt: skip
    return _finish("repurpose", out, {"sft.jsonl": done.sft}, done.dropped, done.inputs, files,
                   params, time.perf_counter() - began, tracking_uri, run_name)  # fmt: skip

"""Documents/s of `data filter`, `data dedup` and `data decontaminate` on the Python standard
library's source (the main job's corpus and recipe, examples/curation/stdlib-code.yaml) at 1 and
2 Ray Data workers on an in-process Ray cluster, and datatrove's local executor on the same
shards, same workers (bench/peers/datatrove_peer.py, in .peers/datatrove: bench/peers/setup.sh
datatrove), with the ratio.

    .venv/bin/python bench/curation.py [--repeats 3] [--workers 1 2] [--no-peer]
                                       [--documents modules|paragraphs]

The corpus is written once as 8 JSONL shards ({"text", "id"}) that both read: a document per
module (168), or with `--documents paragraphs` per blank-line-separated block of five words or
more (~16,000: the same 4.7 MB in documents the size of web paragraphs, where the per-document
costs show rather than Ray's start-up). Each job reads the shards, computes (filter: the
recipe's four heuristic rules; dedup: MinHash signatures, LSH bucket parts, union-find;
decontaminate: 13-gram hashes against HumanEval's 164 problems) and writes its output; the time
is the whole job (datatrove's: its executor's run of every stage), the median of `--repeats`. datatrove has no decontamination to compare here (its n-gram index
is built from lighteval tasks, a download).
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from upcycle.curation.recipe import Recipe  # noqa: E402
from upcycle.jobs.curate import run_decontaminate, run_dedup, run_filter  # noqa: E402
from upcycle.jobs.pipeline_stages import STDLIB_RECIPE  # noqa: E402
from upcycle.jobs.prepare import demo_corpus  # noqa: E402
from upcycle.platform.cluster import ensure_ray, quiet_ray_data_console  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PEER = ROOT / ".peers" / "datatrove" / "bin" / "python"


def documents(unit: str) -> list[dict]:
    """The stdlib corpus as rows {"text", "id"}: a module each, or a paragraph each."""
    rows = [{"text": f.read_text(errors="replace"), "id": str(f)} for f in demo_corpus()]
    if unit == "modules":
        return rows
    return [{"text": p, "id": f"{r['id']}#{n}"} for r in rows
            for n, p in enumerate(r["text"].split("\n\n")) if len(p.split()) >= 5]  # fmt: skip


def write_shards(folder: Path, unit: str, shards: int = 8) -> list[Path]:
    folder.mkdir(parents=True)
    docs = documents(unit)
    paths = []
    for k in range(shards):
        rows = docs[k::shards]
        paths.append(folder / f"part{k}.jsonl")
        paths[-1].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


def peer(shards: Path, workers: int, repeats: int) -> dict:
    """datatrove's medians and outputs: {job: (seconds, documents out)}."""
    run = subprocess.run([str(PEER), str(ROOT / "bench" / "peers" / "datatrove_peer.py"),
                          str(shards), "--workers", str(workers), "--repeats", str(repeats)],
                         capture_output=True, text=True, check=True)  # fmt: skip
    line = next(x for x in run.stdout.splitlines() if x.startswith("RESULT "))
    result = json.loads(line.removeprefix("RESULT "))
    return {job: (statistics.median(r["seconds"]), r["out"]) for job, r in result.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--no-peer", action="store_true", help="ours only")
    parser.add_argument("--documents", choices=["modules", "paragraphs"], default="modules")
    args = parser.parse_args()
    if not args.no_peer and not PEER.exists():
        sys.exit(f"{PEER} is missing: run bench/peers/setup.sh datatrove, or pass --no-peer")
    ensure_ray()
    quiet_ray_data_console()
    root = Path(tempfile.mkdtemp(prefix="bench-curation-"))
    files = write_shards(root / "shards", args.documents)
    uri = f"sqlite:///{root}/mlflow.db"
    recipe = Recipe.from_dict(STDLIB_RECIPE)
    jobs = {
        "filter": lambda out, w: run_filter(files, out, recipe=recipe, workers=w, tracking_uri=uri),
        "dedup": lambda out, w: run_dedup(files, out, workers=w, tracking_uri=uri),
        "decontaminate": lambda out, w: run_decontaminate(
            files, out, against=["humaneval"], workers=w, tracking_uri=uri
        ),
    }
    print(f"{len(documents(args.documents))} {args.documents} of the standard library's source "
          f"in {len(files)} shards")  # fmt: skip
    for workers in args.workers:
        theirs = {} if args.no_peer else peer(root / "shards", workers, args.repeats)
        for name, job in jobs.items():
            times, report = [], {}
            for r in range(args.repeats):
                began = time.perf_counter()
                report = job(root / f"{name}-{workers}-{r}", workers)
                times.append(time.perf_counter() - began)
            s, n = statistics.median(times), report["documents_in"]
            line = (f"{name:14s} workers {workers}: ours {n / s:7.1f} documents/s ({s:.2f} s, "
                    f"{report['documents_out']} out)")  # fmt: skip
            if name in theirs:
                t, out = theirs[name]
                line += (
                    f"; datatrove {n / t:7.1f} ({t:.2f} s, {out} out); ours/datatrove {t / s:.2f}x"
                )
            print(line)


if __name__ == "__main__":
    main()

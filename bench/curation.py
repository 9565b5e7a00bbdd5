"""Documents/s of `data filter`, `data dedup` and `data decontaminate` on the Python standard
library's source (the main job's corpus, its recipe: examples/curation/stdlib-code.yaml), at 1
and 2 Ray Data workers, on an in-process Ray cluster.

    .venv/bin/python bench/curation.py [--repeats 3] [--workers 1 2]

Each job reads the files, computes (filter: the recipe's four heuristic rules; dedup: MinHash
signatures, LSH band groups, union-find; decontaminate: 13-gram hashes against HumanEval's 164
problems) and writes its output folder;
the time is the whole job, the median of `--repeats`. No peer runs here: datatrove is not used
(its MinHash is a four-stage pipeline of its own executor; a run on the same corpus is the
comparison to add).
"""

from __future__ import annotations

import argparse
import statistics
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    ensure_ray()
    quiet_ray_data_console()
    files = demo_corpus()
    root = Path(tempfile.mkdtemp(prefix="bench-curation-"))
    uri = f"sqlite:///{root}/mlflow.db"
    recipe = Recipe.from_dict(STDLIB_RECIPE)
    jobs = {
        "filter": lambda out, w: run_filter(files, out, recipe=recipe, workers=w, tracking_uri=uri),
        "dedup": lambda out, w: run_dedup(files, out, workers=w, tracking_uri=uri),
        "decontaminate": lambda out, w: run_decontaminate(
            files, out, against=["humaneval"], workers=w, tracking_uri=uri
        ),
    }
    print(f"{len(files)} files of the standard library's source")
    for name, job in jobs.items():
        for workers in args.workers:
            times, report = [], {}
            for r in range(args.repeats):
                began = time.perf_counter()
                report = job(root / f"{name}-{workers}-{r}", workers)
                times.append(time.perf_counter() - began)
            s = statistics.median(times)
            print(f"{name:14s} workers {workers}: {report['documents_in'] / s:7.1f} documents/s "
                  f"({s:.2f} s; {report['documents_in']} in, {report['documents_out']} out)")  # fmt: skip


if __name__ == "__main__":
    main()

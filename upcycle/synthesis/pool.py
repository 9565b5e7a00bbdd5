"""Records through a Ray Data actor pool, in fixed groups, and back in input order.

Generation and reward scoring both hold a model per actor and work a group of records per call;
the groups are cut by the driver (not by how Ray Data splits blocks), so what each record gets
never depends on the number of workers. The output file appears whole (a temporary file renamed
onto it).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from upcycle import runtime


def map_groups(
    records: list[dict], actor: type, kwargs: dict, *, group: int, workers: int, num_cpus: float
) -> list[dict]:
    """`actor(**kwargs)` on `workers` Ray actors; each call takes a row {"group": JSON list of
    [index, record]} and returns one of the same shape. The returned records, in input order."""
    import ray.data

    indexed = list(enumerate(records))
    rows = [{"group": json.dumps(indexed[i : i + group])} for i in range(0, len(indexed), group)]
    ds = ray.data.from_items(rows, override_num_blocks=len(rows)).map(
        actor,
        fn_constructor_kwargs=kwargs,
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_cpus=num_cpus,
        runtime_env={"env_vars": runtime.ENGINE_THREAD_ENV},  # engines' threads (see there)
    )
    done = sorted((pair for r in ds.take_all() for pair in json.loads(r["group"])),
                  key=lambda p: p[0])  # fmt: skip
    return [record for _, record in done]


def refuse_existing(out: Path) -> Path:
    """OUT as an absolute path; a FileExistsError if something is already there."""
    out = Path(out).absolute()
    if out.exists():
        raise FileExistsError(f"{out} exists; choose a new output file")
    return out


def write_jsonl(out: Path, records: list[dict]) -> None:
    """OUT as JSONL, appearing whole."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, out)

"""The KubeRay RayJob shipped for training: its embedded training spec is valid for the world
size its entrypoint asks for, and the cluster it describes has that many GPUs. (The RayService
for serving is checked in test_serve_manifests.py.)"""

from __future__ import annotations

import shlex
from pathlib import Path

import yaml

from upcycle.platform.job import TrainJob
from upcycle.platform.plan import GIB, Workload, memory

MANIFEST = Path(__file__).parents[1] / "examples" / "kuberay" / "rayjob-train.yaml"


def _docs() -> dict[str, dict]:
    return {d["kind"]: d for d in yaml.safe_load_all(MANIFEST.read_text())}


def test_rayjob_spec_is_valid_for_its_world_size():
    docs = _docs()
    job_spec = docs["RayJob"]["spec"]
    argv = shlex.split(job_spec["entrypoint"])
    assert argv[:2] == ["upcycle", "train"]
    workers = int(argv[argv.index("--workers") + 1])
    spec_name = Path(argv[2]).name
    job = TrainJob.from_dict(yaml.safe_load(docs["ConfigMap"]["data"][spec_name]))
    layout = job.validate(workers, on_this_machine=False)
    assert layout.world_size == workers
    (group,) = job_spec["rayClusterSpec"]["workerGroupSpecs"]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert group["replicas"] * int(limits["nvidia.com/gpu"]) == workers
    # and it fits the 80 GiB GPUs by the planner's memory model (distributed optimizer)
    work = Workload(job.train.seq_length, layout.micro_batch_size, layout.global_batch_size)
    used = memory(job.model, layout, work).total(distributed_optimizer=True, recompute=False)
    assert used < 80 * GIB * 0.9 - GIB

"""The KubeRay RayJobs shipped: training (its embedded spec is valid for the world size its
entrypoint asks for, and the cluster it describes has that many GPUs) and the 57B upcycling
(the training's layout, pods that hold their ranks). (The RayService for serving is checked in
test_serve_manifests.py.)"""

from __future__ import annotations

import shlex
from pathlib import Path

import yaml

from upcycle.config import from_name
from upcycle.platform.plan import GIB, Workload, memory
from upcycle.training.job import TrainJob

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


UPCYCLE = MANIFEST.with_name("rayjob-upcycle.yaml")


def test_rayjob_upcycle_runs_the_training_layout_and_fits_its_pods():
    """The 57B conversion RayJob: its layout is the training example's, checked against the
    target model for its worker count; the cluster has that many CPUs and each pod's memory
    holds its ranks by the dry run's per-rank figures; it writes the training's init_from."""
    from upcycle.conversion.budget import upcycle_budget
    from upcycle.conversion.shards import parse_layout
    from upcycle.jobs.convert import check_on_ranks

    (rayjob,) = list(yaml.safe_load_all(UPCYCLE.read_text()))
    spec = rayjob["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["upcycle", "convert"]
    workers = int(argv[argv.index("--workers") + 1])
    layout = check_on_ranks(
        argv[argv.index("--to") + 1], parse_layout(argv[argv.index("--layout") + 1]), workers
    )
    train = _docs()
    train_layout = yaml.safe_load(train["ConfigMap"]["data"]["train.yaml"])["layout"]
    assert {k: getattr(layout, k) for k in ("tp", "pp", "ep", "etp")} == {
        k: train_layout[k] for k in ("tp", "pp", "ep", "etp")
    }
    assert argv[2] == yaml.safe_load(train["ConfigMap"]["data"]["train.yaml"])["init_from"]
    (group,) = spec["rayClusterSpec"]["workerGroupSpecs"]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    per_pod = workers // group["replicas"]
    assert per_pod <= int(limits["cpu"])
    budget = upcycle_budget(from_name("qwen2-7b"), from_name("qwen2-57b-a14b"), layout)
    assert (
        per_pod * max(b.holds for b in budget) < int(limits["memory"].removesuffix("Gi")) * GIB / 2
    )

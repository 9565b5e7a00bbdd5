"""Checkpoints of training runs: resume, resharding, damaged checkpoints, a killed worker.

Reference curves and tolerance: tests/training_reference.py.
"""

from __future__ import annotations

import dataclasses
import threading
import time
import warnings
from pathlib import Path

import mlflow
import numpy as np
import psutil
import pytest
from training_reference import TRAIN, assert_same_curve, run_locally

from upcycle.config import Layout
from upcycle.deploy.sources import register, resolve
from upcycle.platform.tracking import spooled_metrics
from upcycle.training.ray_train import fit

TP2_EP2 = Layout(tp=2, ep=2, etp=1, sequence_parallel=True, micro_batch_size=2, global_batch_size=8)


def ray_job(base, name: str, **train_changes):
    return dataclasses.replace(
        base,
        name=name,
        layout=TP2_EP2,
        train=dataclasses.replace(TRAIN, **train_changes),
        tracking_dir="",
    )


@pytest.mark.slow
def test_stop_and_resume_equals_uninterrupted_and_is_tracked(references, tmp_path):
    base, want, root = references["tiny-moe"]
    job = ray_job(base, "moe-resume", stop_at_step=3, expert_load_interval=2)
    assert fit(job, num_workers=2, storage_path=tmp_path).error is None
    assert sorted(spooled_metrics(tmp_path / job.name / "tracking")) == [1, 2, 3]
    # The same name and storage: Ray hands the newest checkpoint back, the run continues.
    result = fit(
        ray_job(base, "moe-resume", expert_load_interval=2), num_workers=2, storage_path=tmp_path
    )
    assert result.error is None and result.metrics["step"] == 5
    assert_same_curve(spooled_metrics(tmp_path / job.name / "tracking"), want)
    # Its step-3 checkpoint (TP2/EP2) continues exactly in one process (TP1/EP1): model and
    # optimizer state reshard (the other direction: test_reshard_from_tp1_to_tp2_ep2).
    back = dataclasses.replace(
        base,
        name="moe-back-to-tp1",
        resume_from=str(tmp_path / job.name / "step_0000003"),
        tracking_dir=str(tmp_path / "back-tracking"),
    )
    got = run_locally(back, tmp_path / "back")
    assert sorted(got) == [4, 5]
    assert_same_curve(got, want, steps=[4, 5])
    _assert_workers_were_quiet()

    # One MLflow run holds both parts, with params, expert metrics and artifacts.
    mlflow.set_tracking_uri(base.tracking_uri)
    (run,) = mlflow.search_runs(
        experiment_names=["upcycle"],
        filter_string="tags.mlflow.runName = 'moe-resume'",
        output_format="list",
    )
    assert run.data.params["model"] == "tiny-moe"
    assert run.data.params["layout.ep"] == "2" and run.data.params["layout.tp"] == "2"
    assert int(run.data.params["data.num_tokens"]) > 10_000
    assert len(run.data.params["data.manifest_sha256"]) == 64
    assert run.data.tags["git_revision"]
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "loss")
    assert sorted({m.step for m in history}) == [1, 2, 3, 4, 5]
    for key in (
        "lm_loss",
        "aux_loss",
        "grad_norm",
        "lr",
        "tokens_per_s",
        "mfu",
        "expert_load/layer_1/cv",
        "expert_load/layer_1/idle_share",
        "expert_load/max_over_mean_max",
    ):
        assert key in run.data.metrics
    assert not [k for k in run.data.metrics if k.startswith("expert_tokens/")]
    client = mlflow.MlflowClient()
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"job.json", "expert_load.png", "expert_load.npy", "expert_load"} <= artifacts
    interval = {a.path for a in client.list_artifacts(run.info.run_id, "expert_load")}
    assert {f"expert_load/step_000000{n}.{x}" for n in (2, 4) for x in ("npy", "png")} == interval
    matrix = np.load(
        mlflow.artifacts.download_artifacts(
            run_id=run.info.run_id, artifact_path="expert_load/step_0000002.npy", dst_path=tmp_path
        )
    )  # steps 1-2: 8 sequences x 32 tokens x top-2, per layer
    assert matrix.shape == (base.model.num_layers, base.model.num_experts)
    assert matrix.dtype == np.int64 and (matrix.sum(axis=1) == 2 * 8 * 32 * 2).all()
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"

    # The run is servable: runs:/ID and a registered version resolve to its newest checkpoint.
    uri = base.tracking_uri
    newest = resolve(f"runs:/{run.info.run_id}", cache_dir=tmp_path, tracking_uri=uri)
    assert newest == tmp_path / job.name / "step_0000005"
    version, ckpt = register(run.info.run_id, "moe-resume", tracking_uri=uri)
    assert ckpt == newest
    assert resolve(f"models:/moe-resume/{version}", cache_dir=tmp_path, tracking_uri=uri) == newest
    assert resolve("models:/moe-resume", cache_dir=tmp_path, tracking_uri=uri) == newest


@pytest.mark.slow
def test_reshard_from_tp1_to_tp2_ep2(references, tmp_path):
    """Model and optimizer state saved in one process continue exactly at TP2/EP2."""
    base, want, _ = references["tiny-moe"]
    single = dataclasses.replace(
        base,
        name="moe-tp1",
        train=dataclasses.replace(TRAIN, stop_at_step=3),
        tracking_dir=str(tmp_path / "tp1-tracking"),
    )
    run_locally(single, tmp_path / "tp1")
    job = dataclasses.replace(
        ray_job(base, "moe-from-tp1"), resume_from=str(tmp_path / "tp1/checkpoints/step_0000003")
    )
    assert fit(job, num_workers=2, storage_path=tmp_path).error is None
    got = spooled_metrics(tmp_path / job.name / "tracking")
    assert sorted(got) == [4, 5]
    assert_same_curve(got, want, steps=[4, 5])


# What megatron-core and Ray Train print at INFO, once per parameter, worker or report: a
# user's console shows none of it (upcycle/__init__.py, upcycle.training.ray_train).
FLOOD = ("Params for bucket", "Number of buckets for gradient all-reduce",
         "Setting up optimizer with config", "Detected Megatron Core",
         "Reporting training result", "Checkpoint successfully created",
         "learning rate decay style")  # fmt: skip


def _assert_workers_were_quiet() -> None:
    """Every Ray worker of this session (every worker group so far) printed its step lines and
    none of FLOOD: read from the files Ray writes each worker's stdout and stderr to."""
    import ray

    logs = Path(ray._private.worker._global_node.get_logs_dir_path())  # no public accessor
    printed = "".join(p.read_text(errors="replace") for p in logs.glob("worker-*.[oe][ur][tr]"))
    assert "step 5/5 loss" in printed
    assert [line for line in FLOOD if line in printed] == []


def test_damaged_newest_checkpoint_falls_back_to_the_previous(references, tmp_path):
    base, want, _ = references["tiny-dense"]
    job = dataclasses.replace(
        base,
        name="dense-damaged",
        train=dataclasses.replace(TRAIN, save_interval=2, stop_at_step=4),
        tracking_dir=str(tmp_path / "tracking"),
    )
    run_locally(job, tmp_path / "out")
    checkpoints = tmp_path / "out" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_0000002", "step_0000004"]
    shard = next((checkpoints / "step_0000004" / "weights").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-16])  # a truncated write
    full = dataclasses.replace(job, train=dataclasses.replace(job.train, stop_at_step=0))
    with pytest.warns(UserWarning, match=r"skipping checkpoint .*step_0000004.*bytes"):
        got = run_locally(full, tmp_path / "out")
    assert_same_curve(got, want)  # steps 3 and 4 were recomputed from step 2
    assert (checkpoints / "step_0000004.damaged").is_dir()  # kept for inspection


def _kill_a_worker_after(spool: Path, step: int, killed: list) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if max(spooled_metrics(spool), default=0) >= step:
            for proc in psutil.process_iter(["cmdline"]):
                if any("RayTrainWorker" in part for part in proc.info["cmdline"] or []):
                    proc.kill()
                    killed.append(proc.pid)
                    return
        time.sleep(0.05)


@pytest.mark.slow
def test_killed_worker_restarts_from_last_checkpoint_with_same_final_loss(
    references, corpus, tmp_path
):
    base, _, _ = references["tiny-dense"]
    steps = 24
    train_cfg = dataclasses.replace(TRAIN, steps=steps, save_interval=4, keep_checkpoints=2)
    reference = dataclasses.replace(
        base, name="dense-24", train=train_cfg, tracking_dir=str(tmp_path / "ref-tracking")
    )
    want = run_locally(reference, tmp_path / "ref")
    job = dataclasses.replace(
        base,
        name="dense-killed",
        layout=Layout(micro_batch_size=2, global_batch_size=8),  # DP=2
        train=train_cfg,
        tracking_dir="",
    )
    killed: list[int] = []
    spool = tmp_path / job.name / "tracking"
    killer = threading.Thread(target=_kill_a_worker_after, args=(spool, 6, killed), daemon=True)
    killer.start()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = fit(job, num_workers=2, storage_path=tmp_path, max_failures=1)
    killer.join(timeout=1)
    assert killed, "no worker was killed: the run finished before the killer saw step 6"
    assert result.error is None and result.metrics["step"] == steps
    got = spooled_metrics(spool)
    assert got[steps]["loss"] == pytest.approx(want[steps]["loss"], rel=1e-5)
    assert_same_curve(got, want, steps=range(1, steps + 1))
    # Only the newest two checkpoints stay, on Ray storage as in the local sink.
    newest = ["step_0000020", "step_0000024"]
    assert sorted(p.name for p in (tmp_path / job.name).glob("step_*")) == newest
    assert sorted(p.name for p in (tmp_path / "ref" / "checkpoints").iterdir()) == newest

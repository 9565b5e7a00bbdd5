"""`--address`: commands submitted as Ray jobs to a real Ray head on loopback (dashboard on,
auth off, its own temp dir); the job's status is the command's exit code and its MLflow run
lands in this side's tracking store."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import pytest
import yaml

from upcycle.platform.checkpoint import newest_valid

BIN = Path(sys.executable).parent


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict[str, str]:
    return {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "180",
        "PATH": f"{BIN}:{os.environ['PATH']}",  # the job's `python` is this environment's
        **extra,
    }


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head started like a user would (`ray start --head`), stopped by its process group
    only (never `ray stop`, which would kill every Ray process on the machine)."""
    from ray.job_submission import JobSubmissionClient

    temp = tempfile.mkdtemp(prefix="rh-", dir="/tmp")  # socket paths must stay short
    dashboard = _port()
    head = subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--block",
            f"--port={_port()}",
            "--num-cpus=4",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            f"--temp-dir={temp}",
            f"--dashboard-agent-listen-port={_port()}",  # not the default one a local cluster holds
            "--disable-usage-stats",
        ],  # fmt: skip
        env=_env(),
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{dashboard}"
    deadline = time.monotonic() + 120
    while True:
        try:
            JobSubmissionClient(url).list_jobs()
            break
        except Exception:  # noqa: BLE001  not up yet
            if time.monotonic() > deadline or head.poll() is not None:
                raise
            time.sleep(1)
    yield url
    os.killpg(head.pid, signal.SIGTERM)
    try:
        head.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(head.pid, signal.SIGKILL)  # what SIGTERM left of the head's processes
    head.wait(timeout=30)
    shutil.rmtree(temp, ignore_errors=True)


def _spec(tmp_path: Path, corpus: Path, name: str, **extra) -> Path:
    spec = tmp_path / f"{name}.yaml"
    job = {
        "name": name,
        "model": "tiny-dense",
        "data": str(corpus),
        "train": {"steps": 2, "warmup_steps": 1, "seq_length": 32, "save_interval": 2},
        **extra,
    }
    spec.write_text(yaml.safe_dump(job))
    return spec


def _submit(tmp_path: Path, spec: Path, url: str) -> subprocess.CompletedProcess:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    return subprocess.run(
        [
            str(BIN / "upcycle"),
            "train",
            spec.name,
            "--workers",
            "1",
            "--max-failures",
            "0",
            "--storage",
            "runs",
            "--address",
            url,
        ],  # fmt: skip
        cwd=tmp_path,
        env=_env(MLFLOW_TRACKING_URI=uri),
        capture_output=True,
        text=True,
        timeout=900,
    )


def test_train_submitted_as_a_ray_job_succeeds_and_is_tracked(ray_head, corpus, tmp_path):
    r = _submit(tmp_path, _spec(tmp_path, corpus, "submitted"), ray_head)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "SUCCEEDED" in r.stdout and "step 2/2" in r.stdout  # the job's logs were streamed
    ckpt = tmp_path / "runs" / "submitted" / "step_0000002"
    assert newest_valid([ckpt]) == ckpt  # written on the cluster, where this folder is shared
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs(
        [client.get_experiment_by_name("upcycle").experiment_id],
        "tags.mlflow.runName = 'submitted'",
    )
    assert run.data.params["model"] == "tiny-dense" and "loss" in run.data.metrics


def test_a_failing_job_fails_the_command(ray_head, corpus, tmp_path):
    spec = _spec(tmp_path, corpus, "doomed", init_from=str(tmp_path / "no-such-checkpoint"))
    r = _submit(tmp_path, spec, ray_head)
    assert r.returncode == 1, r.stdout[-3000:]
    assert "FAILED" in r.stdout and "no-such-checkpoint" in r.stdout


def test_bad_spec_fails_before_anything_is_submitted(ray_head, corpus, tmp_path):
    spec = _spec(tmp_path, corpus, "bad", layout={"tq": 2})
    r = _submit(tmp_path, spec, ray_head)
    assert r.returncode == 2 and "layout.tq" in r.stdout and "submitted" not in r.stdout

"""MLflow tracking that never stops training and never loses a metric.

Every event (params, tags, metrics, artifacts) is first appended to a local spool file, then
replayed to MLflow. If the tracking server is unreachable, training goes on, the events wait in
the spool, and later flushes (or `replay` from another process, `upcycle runs import SPOOL`)
deliver them. The spool remembers the MLflow run id, so a restarted job continues its run.
MLflow's fluent API keeps a global active run per process; the client API with an explicit run
id is what a resumable, replayable log needs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.tracking import MlflowClient

EVENTS = "events.jsonl"
STATE = "state.json"
RETRY_AFTER_S = 30.0
_BATCH = 1000  # MLflow's log_batch limit on metrics per call
CHECKPOINTS_TAG = "checkpoints"  # run tag: the folder holding a training run's step_* checkpoints
# MLflow 3's UI picks an experiment's view (GenAI: traces, judges; or model training: runs,
# charts) from this tag, else infers one. 3.17's UI goes by its own GenAI / Model training
# switch instead (the URL's `?workflowType=machine_learning`, else the browser's last choice):
# `upcycle pipeline` prints that link. Ours are model-training runs either way.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def default_tracking_uri(workdir: Path | None = None) -> str:
    """`MLFLOW_TRACKING_URI`, else a SQLite file in the working folder (the embedded default)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{Path(workdir or Path.cwd()).absolute() / 'mlflow.db'}"


class RunTracker:
    """One MLflow run, written through a spool folder (see the module docstring)."""

    def __init__(self, spool_dir: Path, *, tracking_uri: str, experiment: str, run_name: str):
        self.dir = Path(spool_dir)
        (self.dir / "artifacts").mkdir(parents=True, exist_ok=True)
        self.uri, self.experiment, self.run_name = tracking_uri, experiment, run_name
        self._retry_at = 0.0
        if not _read_state(self.dir):  # a new spool; a restarted job keeps its run
            _write_state(
                self.dir,
                {"tracking_uri": tracking_uri, "experiment": experiment, "run_name": run_name,
                 "run_id": None, "delivered": 0},
            )  # fmt: skip
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")

    # -- recording -------------------------------------------------------------------------
    def _append(self, event: dict) -> None:
        with open(self.dir / EVENTS, "a") as f:
            f.write(json.dumps(event) + "\n")
        self.flush()

    def log_params(self, params: dict[str, Any]) -> None:
        self._append({"kind": "params", "values": {k: str(v)[:6000] for k, v in params.items()}})

    def set_tags(self, tags: dict[str, Any]) -> None:
        self._append({"kind": "tags", "values": {k: str(v) for k, v in tags.items()}})

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        values = {k: float(v) for k, v in metrics.items()}
        self._append({"kind": "metrics", "step": step, "ts": _now_ms(), "values": values})

    def log_artifact(self, path: Path, folder: str = "") -> None:
        """Copy `path` into the spool (it may be temporary), then log it (under `folder`)."""
        name = f"{folder}/{Path(path).name}" if folder else Path(path).name
        (self.dir / "artifacts" / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, self.dir / "artifacts" / name)
        self._append({"kind": "artifact", "file": name})

    def log_input(self, files: list[Path], context: str = "input") -> None:
        """The files a job read, as one MLflow dataset input (the run's lineage): named after the
        first file, its source the paths (up to 100), its digest of every path, size and
        modification time (not the contents: a corpus is large)."""
        files = [Path(f).absolute() for f in files]
        digest = hashlib.sha256()
        for f in files:
            stat = f.stat()
            digest.update(f"{f}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        more = f" and {len(files) - 1} more" if len(files) > 1 else ""
        self._append({"kind": "input", "name": f"{files[0].name}{more}",
                      "digest": digest.hexdigest()[:16], "context": context,
                      "source": json.dumps({"uris": [str(f) for f in files[:100]]})})  # fmt: skip

    def close(self, status: str = "FINISHED") -> bool:
        self._append({"kind": "end", "status": status})
        return self.flush(force=True)

    # -- delivery --------------------------------------------------------------------------
    def flush(self, *, force: bool = False) -> bool:
        """Deliver pending events; on failure keep them and retry later. True if all delivered."""
        if not force and time.monotonic() < self._retry_at:
            return False
        try:
            _deliver(self.dir, self.uri, self.experiment, self.run_name)
        except Exception as e:  # noqa: BLE001 - any tracking failure must not stop training
            if self._retry_at == 0.0 or force:
                warnings.warn(
                    f"MLflow at {self.uri} is unreachable ({type(e).__name__}: {e}); metrics wait "
                    f"in {self.dir / EVENTS} and are delivered when it is back "
                    f"(or later with `upcycle runs import {self.dir}`)",
                    stacklevel=2,
                )
            self._retry_at = time.monotonic() + RETRY_AFTER_S
            return False
        self._retry_at = 0.0
        return True


def track_job(kind: str, run_name: str, *, params: dict[str, Any], metrics: dict[str, float],
              inputs: list[Path] = (), artifacts: list[Path] = (),
              tracking_uri: str | None = None, experiment: str = "upcycle") -> None:  # fmt: skip
    """One MLflow run for a job that runs once, start to end (curation, synthesis): its params,
    a `kind` tag, the files it read as a dataset input, its metrics at step 0 and its
    artifacts."""
    import tempfile

    tracker = RunTracker(
        Path(tempfile.mkdtemp(prefix=f"upcycle-{kind}-")),
        tracking_uri=tracking_uri or default_tracking_uri(),
        experiment=experiment,
        run_name=run_name,
    )
    tracker.log_params(params)
    tracker.set_tags({"kind": kind})
    if inputs:
        tracker.log_input(list(inputs))
    tracker.log_metrics(0, metrics)
    for path in artifacts:
        tracker.log_artifact(Path(path))
    tracker.close()


def spooled_metrics(spool_dir: Path) -> dict[int, dict[str, float]]:
    """Per step, the metrics a spool recorded (a resumed step's later values win)."""
    steps: dict[int, dict[str, float]] = {}
    path = Path(spool_dir) / EVENTS
    for line in path.read_text().splitlines() if path.is_file() else []:
        event = json.loads(line)
        if event["kind"] == "metrics":
            steps.setdefault(event["step"], {}).update(event["values"])
    return dict(sorted(steps.items()))


def replay(spool_dir: Path, tracking_uri: str | None = None) -> str:
    """Deliver a spool's pending events (to its own server, or to `tracking_uri`); the run id."""
    state = _read_state(Path(spool_dir))
    if not state:
        raise FileNotFoundError(f"{spool_dir} is not a tracking spool (no {STATE})")
    return _deliver(
        Path(spool_dir),
        tracking_uri or state["tracking_uri"],
        state["experiment"],
        state["run_name"],
    )


def _now_ms() -> int:
    return int(time.time() * 1000)


def _read_state(spool: Path) -> dict:
    path = spool / STATE
    return json.loads(path.read_text()) if path.is_file() else {}


def _write_state(spool: Path, state: dict) -> None:
    tmp = spool / (STATE + ".tmp")
    tmp.write_text(json.dumps(state))
    os.replace(tmp, spool / STATE)


def _run_id(client: MlflowClient, uri: str, experiment: str, run_name: str) -> str:
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        location = None
        if uri.startswith("sqlite:///"):  # artifacts next to the database, not in the cwd
            location = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
        exp_id = client.create_experiment(
            experiment, artifact_location=location, tags=EXPERIMENT_KIND
        )
    else:
        exp_id = exp.experiment_id
        for key, value in EXPERIMENT_KIND.items():  # made by an older upcycle, or by hand
            if key not in exp.tags:
                client.set_experiment_tag(exp_id, key, value)
    return client.create_run(exp_id, run_name=run_name).info.run_id


def _deliver(spool: Path, uri: str, experiment: str, run_name: str) -> str:
    state = _read_state(spool)
    if state.get("tracking_uri") != uri:  # delivering to another store: a new run there
        state = {"run_id": None, "delivered": 0}
    state.update(tracking_uri=uri, experiment=experiment, run_name=run_name)
    client = MlflowClient(tracking_uri=uri)
    if not state.get("run_id"):
        state.update(run_id=_run_id(client, uri, experiment, run_name), delivered=0)
    _write_state(spool, state)
    run_id = state["run_id"]
    events_path = spool / EVENTS
    lines = events_path.read_text().splitlines() if events_path.is_file() else []
    for line in lines[state["delivered"] :]:
        _send(client, run_id, spool, json.loads(line))
        state["delivered"] += 1
        _write_state(spool, state)
    return run_id


def _send(client: MlflowClient, run_id: str, spool: Path, event: dict) -> None:
    kind = event["kind"]
    if kind == "params":
        # MLflow params are write-once: a resumed job that changed one records it as a tag.
        logged = client.get_run(run_id).data.params
        new = {k: v for k, v in event["values"].items() if k not in logged}
        changed = {f"changed.{k}": v for k, v in event["values"].items() if logged.get(k, v) != v}
        client.log_batch(
            run_id,
            params=[Param(k, v) for k, v in new.items()],
            tags=[RunTag(k, v) for k, v in changed.items()],
        )
    elif kind == "tags":
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in event["values"].items()])
    elif kind == "metrics":
        metrics = [Metric(k, v, event["ts"], event["step"]) for k, v in event["values"].items()]
        for i in range(0, len(metrics), _BATCH):
            client.log_batch(run_id, metrics=metrics[i : i + _BATCH])
    elif kind == "artifact":
        folder = str(Path(event["file"]).parent)
        client.log_artifact(
            run_id, str(spool / "artifacts" / event["file"]), None if folder == "." else folder
        )
    elif kind == "input":
        dataset = Dataset(event["name"], event["digest"], "local", event["source"])
        tags = [InputTag("mlflow.data.context", event["context"])]
        client.log_inputs(run_id, datasets=[DatasetInput(dataset, tags)])
    elif kind == "end":
        client.set_terminated(run_id, event["status"])

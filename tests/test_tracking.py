"""MLflow tracking: an unreachable server loses nothing; the spool delivers later."""

from __future__ import annotations

import socket

import mlflow
import pytest

from upcycle.platform.tracking import RunTracker, replay, spooled_metrics


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


def test_unreachable_server_keeps_training_and_delivers_later(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    down = f"http://127.0.0.1:{_closed_port()}"
    tracker = RunTracker(tmp_path / "spool", tracking_uri=down, experiment="e", run_name="r")
    with pytest.warns(UserWarning, match="unreachable"):
        tracker.log_params({"model": "tiny-moe", "layout.tp": 2})
    for step in range(1, 6):
        tracker.log_metrics(step, {"loss": 10.0 - step, "grad_norm": 1.0 / step})
    (tmp_path / "spec.json").write_text("{}")
    tracker.log_artifact(tmp_path / "spec.json")
    with pytest.warns(UserWarning, match="unreachable"):
        assert tracker.close() is False
    assert sorted(spooled_metrics(tmp_path / "spool")) == [1, 2, 3, 4, 5]

    # Later (or elsewhere), the spool is imported into a reachable store: nothing is lost.
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = replay(tmp_path / "spool", uri)
    client = mlflow.MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.data.params == {"model": "tiny-moe", "layout.tp": "2"}
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(run_id, "loss")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [
        (1, 9.0), (2, 8.0), (3, 7.0), (4, 6.0), (5, 5.0)
    ]  # fmt: skip
    assert [a.path for a in client.list_artifacts(run_id)] == ["spec.json"]
    assert replay(tmp_path / "spool", uri) == run_id  # idempotent: nothing sent twice
    assert len(client.get_metric_history(run_id, "loss")) == 5


def test_resumed_job_with_a_changed_setting_records_it_as_a_tag(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = RunTracker(tmp_path / "spool", tracking_uri=uri, experiment="e", run_name="r")
    first.log_params({"train.stop_at_step": 3, "model": "tiny-dense"})
    second = RunTracker(tmp_path / "spool", tracking_uri=uri, experiment="e", run_name="r")
    second.log_params({"train.stop_at_step": 0, "model": "tiny-dense"})
    assert second.close()
    run_id = replay(tmp_path / "spool")
    run = mlflow.MlflowClient(uri).get_run(run_id)
    assert run.data.params["train.stop_at_step"] == "3"
    assert run.data.tags["changed.train.stop_at_step"] == "0"

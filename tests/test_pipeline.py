"""`upcycle pipeline` (the main job; `make demo` runs it whole in CI): a failing stage is named
and fails the command."""

from __future__ import annotations

from typer.testing import CliRunner

from upcycle.jobs.cli import app


def test_a_failing_stage_is_named_and_exits_non_zero(ray_cluster, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the pipeline's output folder should go")
    result = CliRunner().invoke(app, ["pipeline", "--out", str(blocker)])
    assert result.exit_code == 1
    assert "stage 'prepare data' failed" in " ".join(result.output.split())

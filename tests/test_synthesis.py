"""Data synthesis without a model: the verifiers, rejection into SFT/DPO files that `upcycle sft`
/ `upcycle dpo` accept, and pass@k (the sandbox itself: test_sandbox.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from upcycle.jobs.cli import app
from upcycle.synthesis import humaneval
from upcycle.synthesis.rejection import read_generated, reject
from upcycle.synthesis.verifiers import final_answer, verify_exact
from upcycle.training.chat_data import PackedConversations, PreferencePairs
from upcycle.training.data import DataError


@pytest.mark.parametrize(
    ("sample", "answer", "accepted"),
    [
        ("So the total is 42.", "42", True),
        ("First 3, then 7, so \\boxed{1,000}", "1000", True),
        ("It is \\boxed{\\frac{1}{2}} or so", "\\frac{1}{2}", True),
        ("half: 0.5", "1/2", True),
        ("5 apples and 6 pears: 11 in all", "12", False),
        ("I cannot tell.", "3", False),
        ("The answer is 12.0.", "12", True),
    ],
)
def test_exact_verifier(sample, answer, accepted):
    assert verify_exact(sample, {"answer": answer}).accepted is accepted


def test_final_answer_prefers_the_last_box_with_nested_braces():
    assert final_answer("\\boxed{1} then \\boxed{\\sqrt{2}}") == "\\sqrt{2}"
    assert final_answer("no digits") is None


def _generated(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_rejection_by_hand(tmp_path):
    gen = _generated(tmp_path / "gen.jsonl", [
        {"prompt": "2+2?", "answer": "4", "samples": [
            {"text": "It is 4."}, {"text": "It is 5."}, {"text": "It is 4."}, {"text": "4!"}]},
        {"prompt": [{"role": "user", "content": "3*3?"}], "answer": "9", "samples": [
            {"text": "6"}, {"text": "8"}]},
        {"prompt": "1+1?", "answer": "2", "samples": [{"text": "2"}]},
    ])  # fmt: skip
    out = reject(read_generated(gen), "exact")
    r = out.report
    assert (r["prompts"], r["samples"], r["accepted"]) == (3, 7, 4)
    assert r["acceptance_rate"] == pytest.approx(4 / 7)
    assert [p["accepted"] for p in r["per_prompt"]] == [3, 0, 1]
    assert r["prompts_with_an_accepted_sample"] == 2
    # distinct accepted samples become conversations; pairs need both kinds for one prompt
    assert [c["messages"][-1]["content"] for c in out.sft] == ["It is 4.", "4!", "2"]
    assert out.sft[0]["messages"][0] == {"role": "user", "content": "2+2?"}
    assert out.dpo == [{"prompt": "2+2?", "chosen": "It is 4.", "rejected": "It is 5."}]


def test_synthesize_cli_writes_files_sft_and_dpo_accept(tmp_path):
    gen = _generated(tmp_path / "gen.jsonl", [
        {"prompt": "Write f returning its argument doubled.", "tests": ["assert f(2) == 4"],
         "samples": [{"text": "```python\ndef f(x):\n    return 2 * x\n```"},
                     {"text": "def f(x):\n    return x + 3"},
                     {"text": "def f(x):\n    while True: pass"}]},
    ])  # fmt: skip
    out = tmp_path / "synth"
    r = CliRunner().invoke(app, ["synthesize", "rejection", str(gen), str(out),
                                 "--verifier", "execution", "--timeout", "2"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "1 of 3 samples accepted" in r.output
    report = json.loads((out / "report.json").read_text())
    assert report["per_prompt"][0]["scores"] == [1.0, 0.0, 0.0]
    assert "timeout" in report["per_prompt"][0]["details"][2]
    assert len(PackedConversations(out / "sft.jsonl", seq_length=256, seed=0).rows) == 1
    pairs = PreferencePairs(out / "dpo.jsonl", seq_length=256)
    assert len(pairs) == 1
    # bad input: a named error before anything is verified, and nothing written
    r = CliRunner().invoke(app, ["synthesize", "rejection", str(gen), str(tmp_path / "x"),
                                 "--verifier", "regex"])  # fmt: skip
    assert r.exit_code == 2 and "verifier: unknown 'regex'" in r.output
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "samples": []}\n')
    r = CliRunner().invoke(app, ["synthesize", "rejection", str(tmp_path / "bad.jsonl"),
                                 str(tmp_path / "y"), "--verifier", "exact"])  # fmt: skip
    assert r.exit_code == 2 and "bad.jsonl:1: 'samples'" in r.output
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_a_task_without_its_reference_is_a_named_error(tmp_path):
    gen = _generated(tmp_path / "gen.jsonl", [{"prompt": "a", "samples": [{"text": "1"}]}])
    with pytest.raises(DataError, match="line 1: answer: the exact verifier needs"):
        reject(read_generated(gen), "exact")


def test_pass_at_k_is_the_unbiased_estimator():
    assert humaneval.pass_at_k(10, 0, 1) == 0.0
    assert humaneval.pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert humaneval.pass_at_k(10, 3, 5) == pytest.approx(1 - math.comb(7, 5) / math.comb(10, 5))
    assert humaneval.pass_at_k(5, 4, 2) == 1.0  # fewer than k failures: some k-subset passes
    with pytest.raises(ValueError, match="1 <= k <= n"):
        humaneval.pass_at_k(3, 1, 4)

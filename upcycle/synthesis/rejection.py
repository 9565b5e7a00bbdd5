"""Rejection sampling: keep the generated samples a verifier accepts, as SFT and DPO data.

Input: a generated file (`upcycle generate`), one prompt per line:
    {"prompt": "..." or [messages], <the task's fields: "answer", or "tests"/"code_prefix">,
     "samples": [{"text": "...", ...}, ...]}
Output folder (written whole or not at all, with a manifest):
- sft.jsonl: {"messages": prompt + [{"role": "assistant", "content": accepted}]} for every
  distinct accepted sample (the format `upcycle sft` reads);
- dpo.jsonl: {"prompt", "chosen", "rejected"}: per prompt, its i-th distinct accepted sample
  against its i-th distinct rejected one, i < min(accepted, rejected) (the `upcycle dpo` format),
  accepted ones best score first, rejected ones worst first (with `reward`: best vs worst);
- report.json: every prompt's samples, accepted count and rate; the overall figures.
Execution verdicts run side by side (one sandboxed run each, one per CPU at a time).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from upcycle.atomic import atomic_directory
from upcycle.synthesis.sandbox import DEFAULT, Sandbox
from upcycle.synthesis.verifiers import Verdict, best_of_n, check_name, side_by_side, verifier
from upcycle.training.chat_data import read_jsonl
from upcycle.training.data import DataError


@dataclass(frozen=True)
class Prompt:
    """One line of a generated file: the task record and its sample texts."""

    line: int
    task: dict
    samples: list[str]
    rewards: list[float | None]  # `upcycle reward score`'s, where the file was scored

    @property
    def messages(self) -> list[dict]:
        p = self.task["prompt"]
        return [{"role": "user", "content": p}] if isinstance(p, str) else list(p)


def read_generated(path: Path) -> list[Prompt]:
    """The prompts of a generated file; malformed lines are named by file:line."""
    prompts = []
    for number, record in read_jsonl(path):
        where = f"{path}:{number}"
        prompt = record.get("prompt")
        if not (isinstance(prompt, str) and prompt) and not (
            isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt)
        ):
            raise DataError(f"{where}: 'prompt' must be a string or a list of messages")
        samples = record.get("samples")
        if not isinstance(samples, list) or not samples:
            raise DataError(f"{where}: 'samples' must be a non-empty list of {{\"text\": ...}}")
        texts = [s.get("text") if isinstance(s, dict) else None for s in samples]
        if not all(isinstance(t, str) for t in texts):
            raise DataError(f"{where}: every sample needs a string 'text'")
        task = {k: v for k, v in record.items() if k != "samples"}
        rewards = [s.get("reward") for s in samples]
        prompts.append(Prompt(number, task, texts, rewards))
    return prompts


def _distinct(texts: list[str]) -> list[str]:
    return list(dict.fromkeys(texts))


@dataclass
class Rejection:
    report: dict
    sft: list[dict]
    dpo: list[dict]


def reject(prompts: list[Prompt], verifier_name: str, sandbox: Sandbox = DEFAULT) -> Rejection:
    """Verify every sample; the SFT conversations, DPO pairs and report of the module docstring."""
    check_name(verifier_name)
    per_prompt, sft, dpo = [], [], []
    for p, verdicts in zip(prompts, _verdicts(prompts, verifier_name, sandbox), strict=True):
        judged = list(zip(p.samples, verdicts, strict=True))
        # best accepted first, worst rejected first; file order among equal scores
        good = _distinct([t for t, v in sorted(judged, key=lambda j: -j[1].score) if v.accepted])
        bad = _distinct([t for t, v in sorted(judged, key=lambda j: j[1].score) if not v.accepted])
        sft += [{"messages": p.messages + [{"role": "assistant", "content": t}]} for t in good]
        dpo += [{"prompt": p.task["prompt"], "chosen": g, "rejected": b}
                for g, b in zip(good, bad, strict=False)]  # fmt: skip
        accepted = sum(v.accepted for _, v in judged)
        per_prompt.append({
            "line": p.line, "samples": len(judged), "accepted": accepted,
            "rate": accepted / len(judged), "scores": [v.score for _, v in judged],
            "details": [v.detail for _, v in judged],
        })  # fmt: skip
    samples = sum(r["samples"] for r in per_prompt)
    accepted = sum(r["accepted"] for r in per_prompt)
    report = {
        "verifier": verifier_name,
        "prompts": len(prompts),
        "samples": samples,
        "accepted": accepted,
        "acceptance_rate": accepted / samples if samples else 0.0,
        "prompts_with_an_accepted_sample": sum(r["accepted"] > 0 for r in per_prompt),
        "sft_conversations": len(sft),
        "dpo_pairs": len(dpo),
        "per_prompt": per_prompt,
    }
    return Rejection(report, sft, dpo)


def _verdicts(prompts: list[Prompt], name: str, sandbox: Sandbox) -> list[list[Verdict]]:
    """Each prompt's verdicts: from its rewards (`reward`), or each sample verified on its own,
    side by side."""
    if name == "reward":
        return [_named(p, best_of_n, p.rewards) for p in prompts]
    check = verifier(name, sandbox)
    jobs = [(p, text) for p in prompts for text in p.samples]
    flat = iter(side_by_side(lambda job: _named(job[0], check, job[1], job[0].task), jobs))
    return [[next(flat) for _ in p.samples] for p in prompts]


def _named(prompt: Prompt, fn, *args):
    """`fn(*args)`, its ValueError naming the prompt's line."""
    try:
        return fn(*args)
    except ValueError as e:
        raise DataError(f"line {prompt.line}: {e}") from None


def write(result: Rejection, out: Path) -> None:
    """OUT/{sft.jsonl, dpo.jsonl, report.json}, atomically (an existing OUT is refused)."""
    with atomic_directory(Path(out)) as tmp:
        for name, rows in (("sft.jsonl", result.sft), ("dpo.jsonl", result.dpo)):
            (tmp / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        (tmp / "report.json").write_text(json.dumps(result.report, indent=1))

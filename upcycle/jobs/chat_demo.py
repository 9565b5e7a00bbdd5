"""Demo post-training data from what Python ships (no downloads): questions about standard-library
functions, answered with the first sentence of their docstrings.

    sft.jsonl  {"messages": [system, user "What does json.dumps do?", assistant "<docstring>"]}
    dpo.jsonl  {"prompt": same question, "chosen": its docstring line,
                "rejected": the docstring line of a different function}
"""

from __future__ import annotations

import importlib
import inspect
import json
import random
from pathlib import Path

from upcycle.atomic import atomic_directory

MODULES = (
    "json", "os.path", "shutil", "textwrap", "string", "math", "random", "itertools",
    "functools", "statistics", "fnmatch", "glob", "base64", "hashlib", "heapq", "bisect",
    "difflib", "pathlib", "tempfile", "zipfile", "csv", "copy", "re", "operator",
)  # fmt: skip
SYSTEM = "You are a helpful assistant who knows the Python standard library."


def docstring_facts() -> list[tuple[str, str]]:
    """(question, answer) for every public function of MODULES with a one-line summary."""
    facts = []
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        for name in sorted(vars(module)):
            obj = getattr(module, name)
            if name.startswith("_") or not (inspect.isfunction(obj) or inspect.isbuiltin(obj)):
                continue
            summary = (inspect.getdoc(obj) or "").split("\n\n")[0].replace("\n", " ").strip()
            if 20 <= len(summary) <= 200 and not summary.startswith(name + "("):
                facts.append((f"What does {module_name}.{name} do?", summary))
    return facts


def write(out: Path, seed: int = 0, dpo_pairs: int = 0) -> tuple[Path, Path]:
    """Write sft.jsonl and dpo.jsonl (its first `dpo_pairs` pairs; 0: all) under a new folder
    `out` (atomically)."""
    facts = docstring_facts()
    rng = random.Random(seed)
    with atomic_directory(Path(out)) as tmp:
        sft = [
            {"messages": [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": q},
                {"role": "assistant", "content": a},
            ]}
            for q, a in facts
        ]  # fmt: skip
        dpo = []
        for i, (q, a) in enumerate(facts):
            other = facts[(i + rng.randrange(1, len(facts))) % len(facts)][1]
            dpo.append({"prompt": q, "chosen": a, "rejected": other})
        dpo = dpo[:dpo_pairs] if dpo_pairs else dpo
        for name, records in (("sft.jsonl", sft), ("dpo.jsonl", dpo)):
            (tmp / name).write_text("".join(json.dumps(r) + "\n" for r in records))
    return Path(out) / "sft.jsonl", Path(out) / "dpo.jsonl"


def arithmetic_prompts(n: int = 16, seed: int = 0) -> list[dict]:
    """Verifiable prompts for rejection sampling (`exact` verifier): small sums and products
    with their answers (examples/arithmetic-prompts.jsonl is `arithmetic_prompts()`)."""
    rng = random.Random(seed)
    prompts = []
    for i in range(n):
        a, b = rng.randint(2, 49), rng.randint(2, 49)
        op, answer = ("+", a + b) if i % 2 == 0 else ("*", a * b)
        question = f"What is {a} {op} {b}? Give the number."
        prompts.append({"prompt": [{"role": "user", "content": question}], "answer": str(answer)})
    return prompts

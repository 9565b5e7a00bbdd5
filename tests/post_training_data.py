"""Small SFT and DPO datasets written by the tests (real text, no downloads)."""

from __future__ import annotations

import json
from pathlib import Path

FACTS = [
    ("What is the capital of France?", "Paris is the capital of France."),
    ("Name a prime number.", "Seven is a prime number."),
    ("What colour is the sky?", "The sky is blue on a clear day."),
    ("How many legs has a spider?", "A spider has eight legs."),
    ("What does a compiler do?", "It translates source code into machine code."),
    ("Which planet is largest?", "Jupiter is the largest planet."),
    ("What is water made of?", "Water is hydrogen and oxygen."),
    ("Who wrote Hamlet?", "William Shakespeare wrote Hamlet."),
]


def write_sft(path: Path, copies: int = 2) -> Path:
    lines = []
    for i in range(copies):
        for q, a in FACTS:
            messages = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            if i % 2:
                messages.insert(0, {"role": "system", "content": "You answer briefly."})
            lines.append(json.dumps({"messages": messages}))
    path.write_text("\n".join(lines) + "\n")
    return path


def write_dpo(path: Path) -> Path:
    """Chosen: the right answer; rejected: the answer to another question."""
    lines = [
        json.dumps({"prompt": q, "chosen": a, "rejected": FACTS[(i + 3) % len(FACTS)][1]})
        for i, (q, a) in enumerate(FACTS)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path

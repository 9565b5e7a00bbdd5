"""Data repurposing: the model writes the instruction that a given text answers, and the text is
the response (the Qwen2 report pairs public-domain texts, literature among them, with
instructions this way).

Texts come from documents (text, JSONL or Parquet, read as `upcycle data` reads them); a text
whose prompt does not fit the engine's context is dropped, as is an instruction that fails
`Lengths` (empty, a copy of the text, outside the word bounds). Output: sft.jsonl
{"messages": [user: instruction, assistant: text], "source": the document's id}, which
`upcycle sft` reads.
"""

from __future__ import annotations

from dataclasses import dataclass

from upcycle.synthesis.writer import Lengths, Writer, user

TEMPLATE = (
    "Here is a text.\n\n<text>\n{text}\n</text>\n\nWrite the instruction or question to which "
    "this text is the best response. Reply with the instruction only."
)


@dataclass
class Repurposed:
    sft: list[dict]
    dropped: list[dict]  # {source, reason}
    inputs: int


def repurpose(writer: Writer, texts: list[tuple[str, str]], *, lengths: Lengths) -> Repurposed:
    """An instruction for each (id, text), paired with the text."""
    asks = [user(TEMPLATE.format(text=t)) for _, t in texts]
    fit = [i for i, ask in enumerate(asks) if writer.fits(ask)]
    written = dict(zip(fit, writer.reply([asks[i] for i in fit]), strict=True))
    sft, dropped = [], []
    for i, (source, text) in enumerate(texts):
        instruction = written.get(i)
        why = "text too long" if instruction is None else lengths.reason(instruction, text)
        if why:
            dropped.append({"source": source, "reason": why})
            continue
        sft.append({"messages": [*user(instruction), {"role": "assistant", "content": text}],
                    "source": source})  # fmt: skip
    return Repurposed(sft, dropped, len(texts))

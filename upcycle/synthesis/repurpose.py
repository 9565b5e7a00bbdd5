"""Data repurposing: the model writes the instruction that a given text answers, and the text is
the response (the Qwen2 report pairs public-domain texts, literature among them, with
instructions this way).

Texts come from documents (text, JSONL or Parquet, read as `upcycle data` reads them). A text
longer than `passage_tokens` is cut into passages at paragraph breaks (blank lines), each as
many whole paragraphs as fit; a paragraph longer than that alone, or a passage whose prompt
does not fit the engine's context, is dropped, as is an instruction that fails `Lengths`
(empty, a copy of the passage, outside the word bounds). Output: sft.jsonl
{"messages": [user: instruction, assistant: passage], "source": the document's id,
"passage": its index in the document}, which `upcycle sft` reads.
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
    dropped: list[dict]  # {source, passage, reason}
    inputs: int  # passages


def passages(text: str, limit: int) -> list[str]:
    """`text` as passages of whole paragraphs, each at most `limit` tokens where a paragraph
    alone is not longer."""
    from upcycle.dense.tokenizer import get_tokenizer

    tok = get_tokenizer()
    if len(tok.encode(text)) <= limit:
        return [text]
    out, current, size = [], [], 0
    for paragraph in (p for p in text.split("\n\n") if p.strip()):
        n = len(tok.encode(paragraph)) + 1
        if current and size + n > limit:
            out.append("\n\n".join(current))
            current, size = [], 0
        current.append(paragraph)
        size += n
    return out + (["\n\n".join(current)] if current else [])


def repurpose(writer: Writer, texts: list[tuple[str, str]], *, lengths: Lengths,
              passage_tokens: int) -> Repurposed:  # fmt: skip
    """An instruction for each passage of each (id, text), paired with the passage."""
    if passage_tokens < 1:
        raise ValueError(f"passage_tokens: must be >= 1, got {passage_tokens}")
    items = [(source, i, p) for source, text in texts
             for i, p in enumerate(passages(text, passage_tokens))]  # fmt: skip
    asks = [user(TEMPLATE.format(text=p)) for _, _, p in items]
    fit = [i for i, ask in enumerate(asks) if writer.fits(ask)]
    written = dict(zip(fit, writer.reply([asks[i] for i in fit]), strict=True))
    sft, dropped = [], []
    for i, (source, index, passage) in enumerate(items):
        instruction = written.get(i)
        why = "text too long" if instruction is None else lengths.reason(instruction, passage)
        if why:
            dropped.append({"source": source, "passage": index, "reason": why})
            continue
        sft.append({"messages": [*user(instruction), {"role": "assistant", "content": passage}],
                    "source": source, "passage": index})  # fmt: skip
    return Repurposed(sft, dropped, len(items))

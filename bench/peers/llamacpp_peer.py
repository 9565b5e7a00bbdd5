"""llama.cpp on the serving bench's prompts (runs in .peers/llamacpp: bench/peers/setup.sh).

    .peers/llamacpp/bin/python bench/peers/llamacpp_peer.py HF_DIR PROMPTS.json --tokens 64
        --threads 2 --repeats 5 --dtype bf16

HF_DIR is our `export-hf` folder. llama.cpp reads GGUF: the sdist's convert_hf_to_gguf.py writes
it (cached beside HF_DIR). The converter needs tokenizer files, and our bench models have
vocabularies of their own size: a byte-level BPE of exactly the model's vocabulary is trained
on the Python standard library's source (the prompts are token ids, so which tokens those are
does not matter) and declared a Qwen2 pre-tokenizer, which the converter otherwise refuses for
a tokenizer it has no hash of.

Streams run as llama.cpp's batched decoding (one `llama_decode` per step over all sequences,
as its `batched` example): the prompts prefill in one batch, then each step decodes one token
per sequence, greedy. Prints one line
"RESULT {"streams": {N: {"ttft": [s...], "tps": [...]}}}", where ttft is the prefill of all N
prompts up to the first token and tps the generated tokens per second of the whole run.
"""

from __future__ import annotations

import argparse
import json
import sys
import sysconfig
import time
from pathlib import Path

import llama_cpp
import numpy as np

SDIST = Path(__file__).resolve().parents[2] / ".peers/llamacpp/sdist/llama_cpp_python-0.3.36"


def gguf(hf_dir: Path, dtype: str) -> Path:
    out = hf_dir.with_name(f"{hf_dir.name}-{dtype}.gguf")
    if out.exists():
        return out
    config = json.loads((hf_dir / "config.json").read_text())
    if not (hf_dir / "tokenizer.json").exists():
        _train_tokenizer(hf_dir, config["vocab_size"])
    sys.path.insert(0, str(SDIST / "vendor/llama.cpp"))
    import convert_hf_to_gguf as convert
    from conversion.base import TextModel

    TextModel.get_vocab_base_pre = lambda self, tokenizer: "qwen2"
    sys.argv = ["convert", str(hf_dir), "--outfile", str(out), "--outtype", dtype]
    convert.main()
    return out


def _train_tokenizer(hf_dir: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 1, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = [str(p) for p in sorted(stdlib.glob("*.py"))]
    tok.train(files, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    fast.save_pretrained(hf_dir)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("hf_dir", type=Path)
    parser.add_argument("prompts", type=Path)  # {"N": [[ids...] x N], ...}
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "f32"])
    args = parser.parse_args()
    path = gguf(args.hf_dir, args.dtype)
    batches = {int(n): p for n, p in json.loads(args.prompts.read_text()).items()}
    most = max(batches)
    longest = max(len(p) for ps in batches.values() for p in ps)
    llama_cpp.llama_backend_init()
    model = llama_cpp.llama_model_load_from_file(str(path).encode(),
                                                 llama_cpp.llama_model_default_params())  # fmt: skip
    cp = llama_cpp.llama_context_default_params()
    cp.n_ctx = most * (longest + args.tokens)
    cp.n_batch = cp.n_ubatch = most * longest
    cp.n_seq_max = most
    cp.n_threads = cp.n_threads_batch = args.threads
    ctx = llama_cpp.llama_init_from_model(model, cp)
    n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
    batch = llama_cpp.llama_batch_init(most * longest, 0, 1)

    def fill(rows: list[tuple[int, int, int]]) -> None:
        """(token, position, sequence) rows, logits wanted at each sequence's last row."""
        last = {seq: i for i, (_, _, seq) in enumerate(rows)}
        for i, (tok, pos, seq) in enumerate(rows):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = tok, pos, 1
            batch.seq_id[i][0], batch.logits[i] = seq, last[seq] == i
        batch.n_tokens = len(rows)

    def greedy(i: int) -> int:
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, i), shape=(n_vocab,))
        return int(logits.argmax())

    def once(prompts: list[list[int]]) -> tuple[float, float]:
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
        start = time.perf_counter()
        fill([(t, pos, s) for s, p in enumerate(prompts) for pos, t in enumerate(p)])
        assert llama_cpp.llama_decode(ctx, batch) == 0
        ends = np.cumsum([len(p) for p in prompts]) - 1
        nxt = [greedy(int(i)) for i in ends]
        ttft = time.perf_counter() - start
        for step in range(args.tokens - 1):
            fill([(nxt[s], len(p) + step, s) for s, p in enumerate(prompts)])
            assert llama_cpp.llama_decode(ctx, batch) == 0
            nxt = [greedy(s) for s in range(len(prompts))]
        return ttft, len(prompts) * args.tokens / (time.perf_counter() - start)

    out = {}
    for n, prompts in sorted(batches.items()):
        once(prompts)  # warm-up
        runs = [once(prompts) for _ in range(args.repeats)]
        out[n] = {"ttft": [r[0] for r in runs], "tps": [r[1] for r in runs]}
    print("RESULT " + json.dumps({"streams": out}), flush=True)


if __name__ == "__main__":
    main()

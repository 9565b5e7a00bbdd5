"""vLLM's CPU engine on the serving bench's prompts (runs in .peers/vllm: bench/peers/setup.sh).

    .peers/vllm/bin/python bench/peers/vllm_peer.py HF_DIR PROMPTS.json --tokens 64
        --threads 2 --repeats 5 --dtype bf16

HF_DIR is our `export-hf` folder; the prompts are token ids (`TokensPrompt`, no tokenizer:
`skip_tokenizer_init`). The engine compiles its model (torch.compile) when it starts, outside
the timings. For N streams, N prompts go to one `generate` call: greedy, `--tokens` tokens each
(`ignore_eos`). Time to first token is, as for transformers in bench/serve_throughput.py, the
time of the same call with max_tokens=1 (the offline API hands out tokens only at the end).
Prints one line "RESULT {"streams": {N: {"ttft": [s...], "tps": [...]}}}".
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("hf_dir", type=Path)
    parser.add_argument("prompts", type=Path)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{args.threads - 1}")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    batches = {int(n): p for n, p in json.loads(args.prompts.read_text()).items()}
    longest = max(len(p) for ps in batches.values() for p in ps)
    llm = LLM(
        model=str(args.hf_dir), skip_tokenizer_init=True,
        dtype={"bf16": "bfloat16", "fp32": "float32"}[args.dtype],
        max_model_len=longest + args.tokens, max_num_seqs=max(batches), seed=0,
    )  # fmt: skip

    def generate(prompts: list[list[int]], n: int) -> float:
        params = SamplingParams(max_tokens=n, min_tokens=n, temperature=0.0, ignore_eos=True,
                                detokenize=False)  # fmt: skip
        start = time.perf_counter()
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params,
                            use_tqdm=False)  # fmt: skip
        assert all(len(o.outputs[0].token_ids) == n for o in outs)
        return time.perf_counter() - start

    out = {}
    for n, prompts in sorted(batches.items()):
        generate(prompts, args.tokens)  # warm-up
        runs = [(generate(prompts, 1), generate(prompts, args.tokens))
                for _ in range(args.repeats)]  # fmt: skip
        out[n] = {"ttft": [r[0] for r in runs],
                  "tps": [n * args.tokens / r[1] for r in runs]}  # fmt: skip
    print("RESULT " + json.dumps({"streams": out}), flush=True)


if __name__ == "__main__":
    main()

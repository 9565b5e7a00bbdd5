"""Rollout engines: the serving engine as a Ray actor that samples K responses per prompt with
the newest policy it was sent.

Each engine is `upcycle.deploy`'s `ModelRunner` (its own tp/ep: follower ranks as Ray actors)
and continuous-batching `Engine`, the same code `upcycle serve` and `upcycle generate` run, so the
policy samples exactly as it will be served. It starts with the starting checkpoint (policy
version 0) and afterwards takes weights only from the trainer (`receive`): it reports the
version it holds with every batch, and a batch from an older version is never trained on.

Engines are restartable actors: when one dies Ray restarts it (from the starting checkpoint)
and retries the calls in flight; the restarted engine answers with version 0, and the trainer
sends it the current weights before it samples again (upcycle.rlhf.loop).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from upcycle.rlhf.sync import Inbox
from upcycle.synthesis.generation import GenerateSpec

MAX_RESTARTS = 3


class RolloutEngine:
    """One rollout engine (a Ray actor; `ray.remote(RolloutEngine)` in upcycle.rlhf.driver)."""

    def __init__(self, ckpt: str, runner: dict):
        from upcycle.deploy.app import engine_args
        from upcycle.deploy.engine.batching import Engine
        from upcycle.deploy.engine.runner import ModelRunner, RunnerConfig
        from upcycle.platform.cpu import apply_cpu_patches

        apply_cpu_patches()
        rc = RunnerConfig(**runner)
        self.runner = ModelRunner(Path(ckpt), rc, live_weights=True)
        self.engine = Engine(self.runner.forward, **engine_args(ckpt, rc))
        self.version = 0
        self.inbox = Inbox()

    def receive(self, version: int, rank: int, world: int, part: dict) -> int:
        """File trainer rank `rank`'s part of policy `version`; with the last part, load it.
        The version this engine holds afterwards."""
        full = self.inbox.add(version, rank, world, part)
        if full is not None:
            self.runner.load_weights(full)
            self.engine.scheduler.pool.forget()  # cached prefixes hold the old policy's keys
            self.version = version
        return self.version

    def generate(self, prompts: list[list], spec: dict) -> dict:
        """K samples for each [index, token ids] in `prompts` (sample k of prompt index i is
        seeded from (spec seed, i, k)): {"version", "samples": {index: [{"tokens", "text",
        "logprob", "finish_reason"}]}, "tokens", "seconds", "compiled_steps"} (the engine's decode
        steps so far that ran compiled: 0 where compile is off, not yet hot, or fell back)."""
        gen = GenerateSpec(**spec)
        began = time.perf_counter()
        requests = {}
        for index, ids in prompts:
            for k in range(gen.samples):
                rid = self.engine.add(ids, gen.params(index, k), f"{index}:{k}")
                requests[rid] = {"tokens": [], "text": "", "logprob": 0.0, "finish_reason": None}
        while self.engine.has_work:
            for out in self.engine.step():
                sample = requests[out.request_id]
                sample["tokens"] += out.token_ids
                sample["text"] += out.text
                sample["logprob"] += out.logprob
                sample["finish_reason"] = out.finish_reason
        samples = {
            index: [requests[f"{index}:{k}"] for k in range(gen.samples)] for index, _ in prompts
        }
        return {
            "version": self.version,
            "samples": samples,
            "tokens": sum(len(s["tokens"]) for s in requests.values()),
            "seconds": time.perf_counter() - began,
            "compiled_steps": self.runner.compiled_steps,
        }

    def probe(self, sequences: list[list[int]]) -> torch.Tensor:
        """The full-vocabulary logits [len(sequences), vocab] (fp32) at each sequence's last
        token, computed the way serving computes them: a prefill of all but the last token into
        KV-cache blocks of the engine's pool, then one decode step (the compiled one, where it is
        on)."""
        from upcycle.deploy.engine.blocks import blocks_for
        from upcycle.deploy.engine.kv_cache import StepPlan

        if self.engine.has_work:
            raise RuntimeError("probe: the engine is generating; probe between batches")
        if any(len(s) < 2 for s in sequences):
            raise ValueError("probe: every sequence needs >= 2 tokens (a prefill and a decode)")
        pool = self.engine.scheduler.pool
        tables = [
            [pool.allocate() for _ in range(blocks_for(len(s), pool.block_size))] for s in sequences
        ]
        try:
            heads = [s[:-1] for s in sequences]
            prefill = StepPlan(
                tokens=[t for s in heads for t in s],
                tables=tables,
                offsets=[0] * len(heads),
                lengths=[len(s) for s in heads],
            )
            self.runner.forward(prefill)
            decode = StepPlan([s[-1] for s in sequences], tables, [len(s) for s in heads],
                              [1] * len(heads))  # fmt: skip
            return self.runner.forward(decode)
        finally:
            for table in tables:
                pool.release(table)

"""Continuous batching: requests join the running batch between forwards and leave when done.

`Engine` is the synchronous core (easy to test without a server): each `step()` asks the
`Scheduler` for one `StepPlan` (one token per decoding sequence plus prefill chunks of new
prompts, at most `max_step_tokens` in all, so a long prompt never stalls the running streams for
long; paged KV blocks, prefix sharing and preemption are the scheduler's), runs one forward,
samples, and returns the new text of every sequence that produced a token. `AsyncEngine` runs
that loop on one thread of its own (all torch work of a runner must stay on one thread) and
hands each request an async stream.

Why not megatron-core's engines: its static-batching engine decodes a fixed batch to the end
(no joining mid-flight) and its dynamic engine needs CUDA (see upcycle.deploy.engine.kv_cache).
"""

from __future__ import annotations

import asyncio
import collections
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from upcycle.deploy.engine.blocks import default_blocks
from upcycle.deploy.engine.kv_cache import StepPlan
from upcycle.deploy.engine.sampling import SamplingParams, sample
from upcycle.deploy.engine.scheduler import Scheduler, Sequence

if TYPE_CHECKING:
    from upcycle.deploy.engine.metrics import EngineMetrics


@dataclass
class Output:
    """What one step produced for one request."""

    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None (more to come)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprob: float | None = None  # of this step's token, when the request asked for logprobs


def check_request(
    prompt: list[int], params: SamplingParams, *, max_model_len: int, vocab_limit: int
) -> None:
    """Raise ValueError ("field: why") for a request an engine with these limits cannot serve."""
    if not prompt:
        raise ValueError("prompt: must not be empty")
    if bad := [t for t in prompt if not 0 <= t < vocab_limit]:
        raise ValueError(f"prompt: token ids {bad[:4]} outside [0, {vocab_limit})")
    if len(prompt) >= max_model_len:
        raise ValueError(
            f"prompt: {len(prompt)} tokens; this model's context is {max_model_len} "
            "tokens (prompt + completion)"
        )
    params.check()
    if len(prompt) + params.max_tokens > max_model_len:
        raise ValueError(
            f"max_tokens: {params.max_tokens} + {len(prompt)} prompt tokens exceeds the "
            f"context of {max_model_len}; use max_tokens <= {max_model_len - len(prompt)}"
        )


class Engine:
    """The scheduler around a forward function (`ModelRunner.forward`). `num_blocks` and
    `block_size` describe the runner's KV pool (`RunnerConfig.kv_blocks`; unset, room for
    `max_num_seqs` sequences of `max_model_len`); `reserve_tokens`: room in the pool for this
    many completion tokens of a sequence (at most its max_tokens) is kept from its admission
    (upcycle.deploy.engine.scheduler); `metrics` (upcycle.deploy.engine.metrics) is told of
    every step and token."""

    def __init__(
        self,
        forward: Callable[[StepPlan], torch.Tensor],
        *,
        max_num_seqs: int,
        max_model_len: int,
        max_step_tokens: int,
        eos_ids: tuple[int, ...],
        vocab_limit: int,
        decode: Callable[[list[int]], str],
        num_blocks: int | None = None,
        block_size: int = 16,
        prefix_caching: bool = True,
        reserve_tokens: int = 256,
        metrics: EngineMetrics | None = None,
    ):
        self.forward = forward
        self.max_model_len = max_model_len
        self.eos_ids, self.vocab_limit, self.decode = set(eos_ids), vocab_limit, decode
        if num_blocks is None:
            num_blocks = default_blocks(max_num_seqs, max_model_len, block_size)
        self.scheduler = Scheduler(
            max_num_seqs=max_num_seqs,
            max_step_tokens=max_step_tokens,
            num_blocks=num_blocks,
            block_size=block_size,
            prefix_caching=prefix_caching,
            reserve_tokens=reserve_tokens,
        )
        self.metrics = metrics

    @property
    def waiting(self) -> collections.deque[Sequence]:
        return self.scheduler.waiting

    @property
    def running(self) -> list[Sequence]:
        return self.scheduler.running

    def check(self, prompt: list[int], params: SamplingParams) -> None:
        check_request(
            prompt, params, max_model_len=self.max_model_len, vocab_limit=self.vocab_limit
        )

    def add(self, prompt: list[int], params: SamplingParams, request_id: str | None = None) -> str:
        self.check(prompt, params)
        seq = Sequence(request_id or uuid.uuid4().hex, list(prompt), params, params.generator())
        self.waiting.append(seq)
        return seq.request_id

    def abort(self, request_id: str) -> None:
        self.scheduler.abort(request_id)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def step(self) -> list[Output]:
        """One forward over the running batch; the outputs of the sequences that advanced."""
        plan, fed = self.scheduler.schedule()
        outputs = self._run(plan, fed) if fed else []
        self.scheduler.release_finished()
        if self.metrics is not None:
            self.metrics.step(self.scheduler)
        return outputs

    def _run(self, plan: StepPlan, fed: list[Sequence]) -> list[Output]:
        # ids past the tokenizer's vocabulary (embedding padding) are never sampled
        logits = self.forward(plan)[:, : self.vocab_limit]
        self.scheduler.computed(fed)
        ready = [(i, s) for i, s in enumerate(fed) if s.cached == s.length]
        if len(ready) < len(fed):  # sequences mid-prefill have nothing to sample yet
            logits = logits[[i for i, _ in ready]]
        tokens = sample(logits, [s.params for _, s in ready], [s.generator for _, s in ready])
        outputs = [self._advance(seq, tok) for (_, seq), tok in zip(ready, tokens, strict=True)]
        for row, ((_, seq), out) in enumerate(zip(ready, outputs, strict=True)):
            if seq.params.logprobs:  # the model's own distribution, whatever the sampling
                out.logprob = torch.log_softmax(logits[row], -1)[out.token_ids[0]].item()
        return outputs

    def _advance(self, seq: Sequence, token: int) -> Output:
        now = time.perf_counter()
        if self.metrics is not None:
            self.metrics.token(seq, now)
        seq.last_token_at = now
        seq.generated.append(token)
        p = seq.params
        if (token in self.eos_ids and not p.ignore_eos) or token in p.stop_token_ids:
            seq.finish_reason = "stop"
            body = seq.generated[:-1]
        else:
            body = seq.generated
        text = seq.settled_text + self.decode(body[seq.settled :])
        if not text.endswith("\ufffd"):
            seq.settled, seq.settled_text = len(body), text
        cut = _first_stop(text, p.stop)
        if cut is not None:
            text, seq.finish_reason = text[:cut], "stop"
        elif seq.finish_reason is None:
            if len(seq.generated) >= p.max_tokens or seq.length >= self.max_model_len:
                seq.finish_reason = "length"
            else:
                text = text[: len(text) - _held_back(text, p.stop)]
        if seq.finish_reason is not None and self.metrics is not None:
            self.metrics.finished(seq, now)
        new, seq.text = text[len(seq.text) :], text
        return Output(
            seq.request_id,
            [token],
            new,
            seq.finish_reason,
            prompt_tokens=len(seq.prompt),
            completion_tokens=len(seq.generated),
        )


def _first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else None


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Characters at the end of `text` not to send yet: an incomplete UTF-8 character (decoded
    as U+FFFD), or the start of a stop string that the next tokens may complete."""
    if text.endswith("\ufffd"):
        return len(text) - len(text.rstrip("\ufffd"))
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest


class AsyncEngine:
    """`Engine` on a thread of its own, with one async stream of `Output`s per request.

    `make_forward` runs on that thread and returns the forward function (it builds the model
    there: megatron's CPU patches and any CUDA context belong to the thread that uses them).
    """

    def __init__(self, make_forward: Callable[[], Callable[[StepPlan], torch.Tensor]], **engine):
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._engine_args = engine
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.engine: Engine | None = None
        self._thread = threading.Thread(
            target=self._run, args=(make_forward,), name="upcycle-engine", daemon=True
        )
        self._thread.start()

    def wait_ready(self, timeout: float | None = None) -> None:
        if not self._ready.wait(timeout):
            raise TimeoutError("the model did not load in time")
        if self._error:
            raise RuntimeError(f"the model failed to load: {self._error}") from self._error

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self._error is None

    def check(self, prompt: list[int], params: SamplingParams) -> None:
        self.wait_ready()
        self.engine.check(prompt, params)

    async def generate(
        self, prompt: list[int], params: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[Output]:
        """The outputs of one request as they come; raises ValueError for a bad request."""
        self.check(prompt, params)
        request_id = request_id or uuid.uuid4().hex
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), stream)
        self._commands.put(("add", (prompt, params, request_id)))
        finished = False
        try:
            while not finished:
                out = await stream.get()
                if isinstance(out, BaseException):
                    raise out
                finished = out.finish_reason is not None
                yield out
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._commands.put(("abort", request_id))

    def shutdown(self) -> None:
        self._commands.put(("stop", None))
        self._thread.join(timeout=60)

    def _run(self, make_forward) -> None:
        try:
            self.engine = Engine(make_forward(), **self._engine_args)
        except BaseException as e:  # reported by wait_ready
            self._error = e
            return
        finally:
            self._ready.set()
        engine = self.engine
        while True:
            block = not engine.has_work
            try:
                while True:
                    kind, arg = self._commands.get(block=block)
                    block = False
                    if kind == "stop":
                        return
                    if kind == "add":
                        engine.add(*arg)
                    else:
                        engine.abort(arg)
            except queue.Empty:
                pass
            try:
                outputs = engine.step()
            except Exception as e:  # a failed forward fails every request in flight
                outputs = []
                for seq in list(engine.running) + list(engine.waiting):
                    self._deliver(seq.request_id, e)
                    engine.abort(seq.request_id)
            for out in outputs:
                self._deliver(out.request_id, out)

    def _deliver(self, request_id: str, item) -> None:
        target = self._streams.get(request_id)
        if target:
            loop, stream = target
            loop.call_soon_threadsafe(stream.put_nowait, item)

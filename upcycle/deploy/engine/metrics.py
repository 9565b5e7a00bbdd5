"""Prometheus metrics of one engine replica, through Ray's metrics export.

Ray Serve's own metrics say how many requests reach a deployment and how long its handler
takes; what an operator of an LLM server watches is inside the engine (the names vLLM made
usual): time to first token, time per output token, end-to-end latency, running and waiting
sequences, KV blocks in use, prefix-cache hits, preemptions, tokens. `ray.serve.metrics` tags
each with the application, deployment and replica, and every Ray node serves them at its
metrics export port (`ray_` prefixed, counters `_total` suffixed); the README lists the names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ray.serve import metrics

if TYPE_CHECKING:
    from upcycle.deploy.engine.scheduler import Scheduler, Sequence

TTFT_BUCKETS = [0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 10, 20, 40]
TPOT_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5]
E2E_BUCKETS = [0.1, 0.3, 0.5, 1, 1.5, 2, 2.5, 5, 10, 15, 20, 30, 60, 120, 240, 480]


class EngineMetrics:
    """The replica's engine metrics, tagged `model`; `Engine` calls `step` before each forward,
    `token` for each sampled token and `finished` for each finished request."""

    def __init__(self, model: str):
        tags = {"model": model}

        def tagged(metric):
            metric.set_default_tags(dict(tags))  # (serve adds its tags to the dict)
            return metric

        def counter(name, doc, keys=("model",)):
            return tagged(metrics.Counter(f"upcycle_{name}", description=doc, tag_keys=keys))

        def gauge(name, doc):
            return tagged(metrics.Gauge(f"upcycle_{name}", description=doc, tag_keys=("model",)))

        def histogram(name, doc, bounds):
            return tagged(metrics.Histogram(f"upcycle_{name}", description=doc,
                                            boundaries=bounds, tag_keys=("model",)))  # fmt: skip

        self.ttft = histogram("time_to_first_token_seconds", "Request arrival to its first token",
                              TTFT_BUCKETS)  # fmt: skip
        self.tpot = histogram("time_per_output_token_seconds", "Time between a request's tokens",
                              TPOT_BUCKETS)  # fmt: skip
        self.e2e = histogram("e2e_request_latency_seconds", "Request arrival to its last token",
                             E2E_BUCKETS)  # fmt: skip
        self.running = gauge("num_requests_running", "Sequences in the running batch")
        self.waiting = gauge("num_requests_waiting", "Sequences waiting for room")
        self.blocks_used = gauge("kv_cache_blocks_used", "KV-cache blocks referenced")
        self.blocks_total = gauge("kv_cache_blocks_total", "KV-cache blocks in the pool")
        self.hit_rate = gauge("prefix_cache_hit_rate", "Prompt tokens found cached, since start")
        self.queries = counter("prefix_cache_queries", "Prompt tokens looked up in the cache")
        self.hits = counter("prefix_cache_hits", "Prompt tokens found in the cache")
        self.preemptions = counter("num_preemptions", "Sequences preempted for KV blocks")
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of finished requests")
        self.generation_tokens = counter("generation_tokens", "Tokens generated")
        self.requests = counter("request_success", "Finished requests by finish reason",
                                ("model", "finished_reason"))  # fmt: skip
        self._seen = {"queries": 0, "hits": 0, "preemptions": 0}

    def step(self, scheduler: Scheduler) -> None:
        self.running.set(len(scheduler.running))
        self.waiting.set(len(scheduler.waiting))
        self.blocks_used.set(scheduler.pool.used)
        self.blocks_total.set(scheduler.pool.num_blocks)
        totals = {
            "queries": scheduler.prompt_tokens_queried,
            "hits": scheduler.prompt_tokens_hit,
            "preemptions": scheduler.preemptions,
        }
        for name, total in totals.items():
            if total > self._seen[name]:
                getattr(self, name).inc(total - self._seen[name])
                self._seen[name] = total
        if totals["queries"]:
            self.hit_rate.set(totals["hits"] / totals["queries"])

    def token(self, seq: Sequence, now: float) -> None:
        if seq.last_token_at:
            self.tpot.observe(now - seq.last_token_at)
        else:
            self.ttft.observe(now - seq.arrived)
        self.generation_tokens.inc()

    def finished(self, seq: Sequence, now: float) -> None:
        self.e2e.observe(now - seq.arrived)
        self.prompt_tokens.inc(len(seq.prompt))
        self.requests.inc(tags={"finished_reason": seq.finish_reason})

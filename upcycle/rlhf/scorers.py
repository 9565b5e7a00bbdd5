"""Who scores an iteration's responses: a verifier, or a reward model on a Ray actor.

- A verifier (`exact`, `execution`; upcycle.synthesis.verifiers) judges one response against its
  prompt's task fields; the score is the verdict's (1/0 for exact, the share of tests passed for
  execution). It runs where the loop's coordinator runs (trainer rank 0), the responses side by
  side; `execution` runs them in the job's `sandbox`, checked there once more before the first
  rollout (the driver checked it on its own machine; rank 0 may be on another node).
- A reward model (our checkpoint with a score head) runs on a `RewardScorer` actor
  (upcycle.synthesis.scoring, the same scorer as `upcycle reward score`), which reads each
  (prompt, response text) exactly as reward training read its pairs.
"""

from __future__ import annotations

from upcycle.rlhf.spec import VERIFIER_SCORERS, RlhfJob
from upcycle.synthesis.sandbox import Sandbox
from upcycle.synthesis.verifiers import side_by_side, verifier


class VerifierScorer:
    def __init__(self, name: str, sandbox: Sandbox):
        if name == "execution" and sandbox.kind != "process":  # the driver warned of `process`
            sandbox.require()
        self.judge = verifier(name, sandbox)

    def __call__(self, tasks: list[dict], samples: list[list[dict]]) -> list[list[float]]:
        jobs = [(s["text"], task) for task, group in zip(tasks, samples, strict=True)
                for s in group]  # fmt: skip
        scores = iter(side_by_side(lambda job: self.judge(*job).score, jobs))
        return [[next(scores) for _ in group] for group in samples]


class RewardModelScorer:
    def __init__(self, actor):
        self.actor = actor

    def __call__(self, tasks: list[dict], samples: list[list[dict]]) -> list[list[float]]:
        import ray

        records = [
            {"prompt": task["prompt"], "samples": [{"text": s["text"]} for s in group]}
            for task, group in zip(tasks, samples, strict=True)
        ]
        return ray.get(self.actor.rewards.remote(records))


def start_reward_model(ckpt: str, max_length: int, threads: int = 1):
    """A `RewardScorer` actor holding the reward model `ckpt`."""
    import ray

    from upcycle.synthesis.scoring import RewardScorer

    actor = ray.remote(num_cpus=1, max_restarts=3, max_task_retries=-1)(RewardScorer)
    return actor.remote(ckpt, max_length, threads)


def scorer_for(job: RlhfJob, actor=None):
    """The scorer the loop calls: the job's verifier, or the reward model on `actor`."""
    if job.scorer in VERIFIER_SCORERS:
        return VerifierScorer(job.scorer, Sandbox(kind=job.sandbox))
    return RewardModelScorer(actor)

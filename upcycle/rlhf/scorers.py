"""Who scores an iteration's responses: a verifier, or a reward model on a Ray actor.

- A verifier (`exact`, `execution`; upcycle.synthesis.verifiers) judges one response against its
  prompt's task fields; the score is the verdict's (1/0 for exact, the share of tests passed for
  execution). It runs where the loop's coordinator runs (trainer rank 0).
- A reward model (our checkpoint with a score head) runs on a `RewardScorer` actor
  (upcycle.synthesis.scoring, the same scorer as `upcycle reward score`), which reads each
  (prompt, response text) exactly as reward training read its pairs.
"""

from __future__ import annotations

from upcycle.rlhf.spec import VERIFIER_SCORERS
from upcycle.synthesis.verifiers import verifier


class VerifierScorer:
    def __init__(self, name: str):
        self.judge = verifier(name)

    def __call__(self, tasks: list[dict], samples: list[list[dict]]) -> list[list[float]]:
        return [
            [self.judge(s["text"], task).score for s in group]
            for task, group in zip(tasks, samples, strict=True)
        ]


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


def scorer_for(name: str, actor=None):
    """The scorer the loop calls: a verifier by name, or the reward model on `actor`."""
    return VerifierScorer(name) if name in VERIFIER_SCORERS else RewardModelScorer(actor)

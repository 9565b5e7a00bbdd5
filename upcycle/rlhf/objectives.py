"""What an RLHF step minimises: online DPO on best-vs-worst pairs, or GRPO.

Both read per-token log-probabilities of the sampled responses: log pi(y_t | x, y_<t) is minus
the model's per-token loss at the response's labels (`RolloutBatch.loss_mask`).

Online DPO (Qwen2's online stage): per prompt, the highest- and lowest-scored of its K responses
form a pair (the first of equals on each side), and the loss is DPO's (Rafailov et al. 2023)
against the frozen starting policy,
    -log sigmoid(beta * [(log pi(best) - log ref(best)) - (log pi(worst) - log ref(worst))]),
averaged over the iteration's pairs whose two scores differ (a tie says nothing about
preference; its weight is 0).

GRPO (Shao et al. 2024, DeepSeekMath), no value model: a response's advantage is its score
normalised within its prompt's group, A_i = (r_i - mean(r)) / (std(r) + 1e-4) (std with
Bessel's correction, as TRL computes it); per response token, with the ratio
rho_t = pi(y_t) / pi_old(y_t) to the policy that sampled the rollouts,
    l_t = -[min(rho_t A, clip(rho_t, 1 - clip, 1 + clip) A) - kl_coef * KL_t],
    KL_t = pi_ref(y_t)/pi(y_t) - log(pi_ref(y_t)/pi(y_t)) - 1   (the k3 estimator, >= 0),
averaged over each response's tokens, then over the responses.

Like upcycle.training.objectives, each objective is a megatron-core forward step and the frozen
reference (and GRPO's old policy) runs forward-only through the same schedule first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from upcycle.training.data import Batch
from upcycle.training.objectives import FrozenPass, forward_tokens, sequence_logps

GRPO_STD_EPS = 1e-4


@dataclass(frozen=True)
class RolloutBatch(Batch):
    """A micro-batch of sampled responses. Online DPO: rows [best..., worst...] and one
    `weights` entry per pair; GRPO: one row per response and its `advantages`."""

    weights: torch.Tensor | None = None
    advantages: torch.Tensor | None = None


def best_and_worst(scores: list[float]) -> tuple[int, int]:
    """The indices of a prompt's best- and worst-scored responses (the first of equals)."""
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))
    worst = min(range(len(scores)), key=lambda i: (scores[i], i))
    return best, worst


def grpo_advantages(scores: torch.Tensor) -> torch.Tensor:
    """Group-normalised advantages of scores [prompts, K]."""
    scores = scores.double()
    mean, std = scores.mean(dim=1, keepdim=True), scores.std(dim=1, keepdim=True)
    return ((scores - mean) / (std + GRPO_STD_EPS)).float()


def online_dpo_loss(
    policy: torch.Tensor,
    reference: torch.Tensor,
    weights: torch.Tensor,
    tokens: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of rows [best..., worst...] (log-probs summed over each row's `tokens` response
    tokens), each pair's term times its weight (upcycle.rlhf.batches: 0 for a tie, and the
    normalisation to a mean over untied pairs), and its metrics; `kl` is the rows' mean
    per-token log pi - log ref."""
    k = policy.shape[0] // 2
    chosen = beta * (policy[:k] - reference[:k])
    rejected = beta * (policy[k:] - reference[k:])
    w = weights.to(policy.device, torch.float32)
    loss = (-F.logsigmoid(chosen - rejected) * w).mean()
    value = loss.detach().clone()  # the schedule divides `loss` in place
    margin = (chosen - rejected).detach()
    return loss, {
        "objective": value,
        "dpo_loss": value,
        "rewards/margin": (margin * w).mean(),
        "rewards/accuracy": ((margin > 0).float() * w).mean(),
        "pairs_used": (w > 0).float().mean(),  # the share of prompts whose scores were not all tied
        "kl": ((policy - reference).detach() / tokens.to(policy.device).clamp(min=1)).mean(),
    }


def grpo_loss(
    logps: torch.Tensor,
    old: torch.Tensor,
    ref: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    clip: float,
    kl_coef: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO's loss from per-token log-probs [rows, seq] (policy, old policy, reference), the
    response mask and per-row advantages; and its metrics."""
    mask = mask.to(logps.device, torch.float32)
    a = advantages.to(logps.device, torch.float32)[:, None]
    ratio = torch.exp(logps - old)
    surrogate = torch.minimum(ratio * a, ratio.clamp(1 - clip, 1 + clip) * a)
    log_ref_ratio = ref - logps
    kl = torch.exp(log_ref_ratio) - log_ref_ratio - 1
    per_token = -(surrogate - kl_coef * kl)
    tokens = mask.sum(dim=1).clamp(min=1.0)
    loss = ((per_token * mask).sum(dim=1) / tokens).mean()
    value = loss.detach().clone()
    clipped = ((ratio - 1).abs() > clip).float()
    return loss, {
        "objective": value,
        "grpo_loss": value,
        "kl": ((kl.detach() * mask).sum(dim=1) / tokens).mean(),
        "clip_fraction": ((clipped * mask).sum(dim=1) / tokens).mean(),
    }


class OnlineDpo:
    """Online DPO's forward step; `reference` runs first in each step."""

    def __init__(self, beta: float):
        self.beta = beta
        self.reference = FrozenPass(per_token=False)

    def step(self, data_iterator, model):
        batch: RolloutBatch = next(data_iterator)
        output = forward_tokens(model, batch)

        def loss_func(per_token_loss: torch.Tensor):
            policy = sequence_logps(per_token_loss, batch.loss_mask)
            reference = self.reference.values[id(batch)]
            tokens = batch.loss_mask.sum(dim=1)
            return online_dpo_loss(policy, reference, batch.weights, tokens, self.beta)

        return output, loss_func


class Grpo:
    """GRPO's forward step; `reference` (and `old`, when an iteration takes several steps)
    run first."""

    def __init__(self, clip: float, kl_coef: float):
        self.clip, self.kl_coef = clip, kl_coef
        self.reference = FrozenPass(per_token=True)
        self.old = FrozenPass(per_token=True)  # the policy the rollouts came from

    def step(self, data_iterator, model):
        batch: RolloutBatch = next(data_iterator)
        output = forward_tokens(model, batch)

        def loss_func(per_token_loss: torch.Tensor):
            logps = -per_token_loss.float()
            old = self.old.values.get(id(batch), logps.detach())  # one step: the same policy
            return grpo_loss(logps, old, self.reference.values[id(batch)], batch.loss_mask,
                             batch.advantages, self.clip, self.kl_coef)  # fmt: skip

        return output, loss_func

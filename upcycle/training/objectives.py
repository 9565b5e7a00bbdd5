"""What a training step minimises: next-token loss (pretraining, SFT), DPO, or a reward model's
Bradley-Terry loss.

Each objective is a megatron-core `forward_step_func`: it feeds one micro-batch to a model chunk
and returns the loss function the schedule calls on the last pipeline stage. The loss function's
dict is the micro-batch's metrics: "objective" is the minimised value, the other keys are logged
as they are (upcycle.training.loop averages them over micro-batches and data-parallel ranks).
Inputs, positions and the attention mask reach every pipeline stage, so any layout works.

SFT's loss is the mean over the micro-batch's assistant tokens (`Batch.loss_mask`).

DPO (Rafailov et al. 2023): with log-probabilities summed over each response,
    r_chosen = beta * (log pi(chosen) - log ref(chosen)),  r_rejected likewise,
    loss = -log sigmoid(r_chosen - r_rejected)   (mean over the micro-batch's pairs).
The reference terms come from a frozen copy of the starting model that runs forward-only through
the same schedule and layout right before the policy's step (`Dpo.reference`); its
log-probabilities wait, keyed by micro-batch, for the policy's loss function on the last stage.

Reward model (a score head, upcycle.dense.score_head): a row's reward is the score at its last
token (the response's `<|im_end|>`), as transformers' Qwen2ForSequenceClassification pools it;
on the same pairs as DPO, loss = -log sigmoid(r_chosen - r_rejected) (Bradley-Terry), mean over
the micro-batch's pairs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from upcycle import runtime
from upcycle.training.data import Batch


def forward_tokens(model, batch: Batch) -> torch.Tensor:
    """Per-token next-token loss [rows, seq] on the last stage (hidden states elsewhere)."""
    device = runtime.device()
    mask = batch.attention_mask
    return model(
        batch.tokens.to(device),
        batch.positions.to(device),
        None if mask is None else mask.to(device),
        labels=batch.labels.to(device),
    )


def lm_step(data_iterator, model):
    """Next-token loss: over every token (pretraining) or the masked ones (SFT)."""
    batch: Batch = next(data_iterator)
    output = forward_tokens(model, batch)

    def loss_func(per_token_loss: torch.Tensor):
        if batch.loss_mask is None:
            loss = per_token_loss.float().mean()
        else:
            mask = batch.loss_mask.to(per_token_loss.device)
            loss = (per_token_loss.float() * mask).sum() / mask.sum().clamp(min=1)
        value = loss.detach().clone()  # the schedule divides `loss` in place
        return loss, {"objective": value, "lm_loss": value}

    return output, loss_func


def sequence_logps(per_token_loss: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """log p(response | prompt) per row: minus the per-token loss summed over the mask."""
    return -(per_token_loss.float() * loss_mask.to(per_token_loss.device)).sum(dim=1)


def dpo_loss(
    policy: torch.Tensor, reference: torch.Tensor, beta: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO loss of rows [chosen..., rejected...] and its metrics (see the module docstring)."""
    k = policy.shape[0] // 2
    chosen = beta * (policy[:k] - reference[:k])
    rejected = beta * (policy[k:] - reference[k:])
    return _bradley_terry(chosen, rejected, "dpo_loss")


def _bradley_terry(
    chosen: torch.Tensor, rejected: torch.Tensor, name: str
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """-log sigmoid(chosen - rejected), mean over pairs, logged as `name`, and the pair metrics
    DPO's implicit rewards and a reward model's scores share."""
    loss = -F.logsigmoid(chosen - rejected).mean()
    value = loss.detach().clone()  # the schedule divides `loss` in place
    return loss, {
        "objective": value,
        name: value,
        "rewards/chosen": chosen.detach().mean(),
        "rewards/rejected": rejected.detach().mean(),
        "rewards/margin": (chosen - rejected).detach().mean(),
        "rewards/accuracy": (chosen > rejected).float().mean(),
    }


def last_token_scores(scores: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """A reward model's output [rows, seq, 1] -> each row's score at its last token [rows]."""
    rows = torch.arange(scores.shape[0], device=scores.device)
    return scores[rows, lengths.to(scores.device) - 1, 0]


def reward_loss(rewards: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Bradley-Terry loss of rewards [chosen..., rejected...] and its metrics."""
    k = rewards.shape[0] // 2
    loss, metrics = _bradley_terry(rewards[:k], rewards[k:], "reward_loss")
    r = rewards.detach()
    return loss, {**metrics, "rewards/mean": r.mean(), "rewards/std": r.std(correction=0)}


def reward_step(data_iterator, model):
    """A reward model on preference pairs: Bradley-Terry loss of the last-token scores."""
    batch: Batch = next(data_iterator)
    device = runtime.device()
    output = model(batch.tokens.to(device), batch.positions.to(device), None)

    def loss_func(scores: torch.Tensor):
        return reward_loss(last_token_scores(scores.float(), batch.lengths))

    return output, loss_func


class FrozenPass:
    """Log-probabilities of a frozen model (DPO's reference; RLHF's reference and old policy)
    over this step's micro-batches, forward only, keyed by micro-batch for the policy's loss
    function: summed over each row's response (`per_token=False`) or per token."""

    def __init__(self, per_token: bool = False):
        self.per_token = per_token
        self.values: dict[int, torch.Tensor] = {}

    def run(self, forward_backward, chunks, micro: list[Batch], **schedule) -> None:
        outputs = forward_backward(
            forward_step_func=self._step,
            data_iterator=data_iterators(micro, chunks),
            model=chunks,
            forward_only=True,
            **schedule,
        )
        # only the last pipeline stage has outputs (and only it needs them)
        self.values = {id(b): d["logps"] for b, d in zip(micro, outputs, strict=False)}

    def _step(self, data_iterator, model):
        batch: Batch = next(data_iterator)
        output = forward_tokens(model, batch)

        def loss_func(per_token_loss: torch.Tensor):
            if self.per_token:
                logps = -per_token_loss.float()
            else:
                logps = sequence_logps(per_token_loss, batch.loss_mask)
            return logps.sum() * 0, {"logps": logps.detach()}

        return output, loss_func


class Dpo:
    """The DPO objective of one job: `reference(...)` then `policy_step` for every step."""

    def __init__(self, beta: float):
        self.beta = beta
        self._reference = FrozenPass()

    def reference(self, forward_backward, ref_chunks, micro: list[Batch], **schedule) -> None:
        """Run the frozen reference over this step's micro-batches (forward only)."""
        self._reference.run(forward_backward, ref_chunks, micro, **schedule)

    def policy_step(self, data_iterator, model):
        batch: Batch = next(data_iterator)
        output = forward_tokens(model, batch)

        def loss_func(per_token_loss: torch.Tensor):
            policy = sequence_logps(per_token_loss, batch.loss_mask)
            return dpo_loss(policy, self._reference.values.pop(id(batch)), self.beta)

        return output, loss_func


def data_iterators(micro: list[Batch], chunks: list) -> object:
    """The schedule's data iterator: one per virtual pipeline chunk when there are several."""
    return [iter(micro) for _ in chunks] if len(chunks) > 1 else iter(micro)

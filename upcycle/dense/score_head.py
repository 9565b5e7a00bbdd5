"""The reward model's head: one scalar per position in place of the vocabulary logits.

transformers' `Qwen2ForSequenceClassification` (num_labels 1) is the Qwen2 backbone plus `score`,
a bias-free Linear(hidden, 1) applied after the final norm; the reward of a sequence is the score
at its last token. `ScoreHead` takes the place of GPTModel's `output_layer` and speaks its call
convention (`head(hidden, weight=..., runtime_gather_output=...) -> (out, bias)`), so GPTModel's
own forward, pipeline stages and dist checkpoints work unchanged: the model returns [b, s, 1]
instead of [b, s, vocab].

Its one weight row is replicated across tensor-parallel ranks. With sequence parallelism each
rank scores its slice of the sequence and the scores are gathered (their gradient split back);
the weight is marked `sequence_parallel` so megatron-core's `finalize_model_grads` sums its
partial gradients over the TP group, as it does for the norms.
Why not megatron's ColumnParallelLinear: it would split one output row over TP ranks.
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
from megatron.core.transformer.transformer_config import TransformerConfig

INIT_SEED = 0  # the head starts from normal(0, init_std) drawn from this seed on every layout


class ScoreHead(torch.nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.sequence_parallel = config.sequence_parallel
        self.weight = torch.nn.Parameter(
            torch.empty(1, config.hidden_size, dtype=config.params_dtype)
        )
        if config.perform_initialization and not self.weight.is_meta:
            # a generator of its own: the same start on every rank and pipeline layout
            g = torch.Generator().manual_seed(INIT_SEED)
            with torch.no_grad():
                self.weight.copy_(
                    torch.randn(self.weight.shape, generator=g) * config.init_method_std
                )
        self.weight.sequence_parallel = config.sequence_parallel

    def forward(self, hidden: torch.Tensor, weight=None, runtime_gather_output=None):
        """[s, b, h] (a sequence slice under sequence parallelism) -> ([s, b, 1], None)."""
        scores = hidden @ self.weight.t()
        if self.sequence_parallel:
            scores = gather_from_sequence_parallel_region(scores, tensor_parallel_output_grad=False)
        return scores, None

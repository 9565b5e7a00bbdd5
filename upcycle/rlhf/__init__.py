"""Online RLHF on Ray: rollout engines, a scorer, the trainer group and the weights between."""

"""Qwen2-MoE on megatron-core (routed + gated shared experts) and dense -> MoE upcycling."""

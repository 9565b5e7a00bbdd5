"""Training on megatron-core: the job spec, the loop every rank runs, its objectives (LM, DPO,
reward), training data, expert-load telemetry, perplexity, and the Ray Train entry point."""

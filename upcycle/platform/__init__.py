"""Where Ray meets megatron-core: process groups, the CPU layer, checkpoints, training, tracking."""

"""Where Ray meets megatron-core: the CPU layer, process groups, checkpoints, MLflow tracking,
the layout planner, FLOPs, and the local Ray cluster."""

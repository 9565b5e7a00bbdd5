"""Checkpoint conversion: transformers folders <-> our checkpoints, and dense -> MoE upcycling, in
one process or on a group of Ray actor ranks that each handle only their shard."""

"""upcycle: train, upcycle (dense -> fine-grained MoE) and serve Qwen2-family models on Ray."""

__version__ = "0.1.0"

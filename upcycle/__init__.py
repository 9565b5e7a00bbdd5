"""upcycle: train, upcycle (dense -> fine-grained MoE) and serve Qwen2-family models on Ray."""

import warnings

# megatron-core warns at import, in every process, that Apex and Transformer Engine are absent:
# expected without a GPU and said once in the README. Filtered here, before any upcycle module
# imports megatron-core (Ray workers import `upcycle` first when they unpickle our functions).
warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).* not installed")

__version__ = "0.1.0"

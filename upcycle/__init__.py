"""upcycle: train, upcycle (dense -> fine-grained MoE) and serve Qwen2-family models on Ray."""

import logging
import warnings

# megatron-core warns at import, in every process, that Apex and Transformer Engine are absent:
# expected without a GPU and said once in the README. Filtered here, before any upcycle module
# imports megatron-core (Ray workers import `upcycle` first when they unpickle our functions).
warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).* not installed")
# ... and logs at INFO what only its developers read: every parameter of every DDP bucket, each
# optimizer's whole config, Megatron-FSDP (unused here) being detected. Ray Train workers set the
# root logger to INFO and show it all, once per worker and stage (~400 lines of a demo).
# Warnings and errors still show.
logging.getLogger("megatron.core").setLevel(logging.WARNING)
# torch 2.13 deprecates APIs that megatron-core 0.16.1's distributed checkpointing and
# all-gathers still call (`load_state_dict`, ShardedTensor, all_gather_into_tensor): nothing a
# user can act on, and each Ray worker of each stage printed them again.
for _message in ("`load_state_dict` is deprecated", "Please use DTensor instead",
                 "`torch.distributed.all_gather_into_tensor` is deprecated"):  # fmt: skip
    warnings.filterwarnings("ignore", message=_message, category=FutureWarning)
del _message

__version__ = "0.1.0"

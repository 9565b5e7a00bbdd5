"""Initialise torch.distributed and megatron-core's parallel state from a `Layout`.

In Ray Train workers the default process group already exists (Ray made it); a plain process
(CLI, tests, conversion) gets a one-rank gloo/nccl group on loopback.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator

import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

from upcycle import runtime
from upcycle.config import Layout
from upcycle.platform.cpu import apply_cpu_patches


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _current_sizes() -> tuple[int, ...] | None:
    """The parallel sizes megatron-core's state was initialised with (None: not initialised)."""
    ps = parallel_state
    if not ps.model_parallel_is_initialized():
        return None
    return (dist.get_world_size(), ps.get_tensor_model_parallel_world_size(),
            ps.get_pipeline_model_parallel_world_size(),
            ps.get_virtual_pipeline_model_parallel_world_size() or 1,
            ps.get_expert_model_parallel_world_size(),
            ps.get_expert_tensor_parallel_world_size())  # fmt: skip


def init_parallel_state(layout: Layout, *, seed: int = 1234) -> Layout:
    """Set up megatron-core's TP/PP/EP/DP groups over the existing default group.

    Returns the layout with dp resolved against the world size. When the state already has
    these sizes it is kept (only reseeded): megatron-core's `destroy_model_parallel` forgets its
    groups without destroying them, and each gloo group keeps three polling threads, so a
    process that re-initialised for every job (a test session: ~60 jobs) ended up with ~3,000
    threads using a whole core while idle and halving the speed of everything else.
    """
    apply_cpu_patches()
    layout = layout.resolve(dist.get_world_size())
    sizes = (layout.world_size, layout.tp, layout.pp, layout.vpp, layout.ep, layout.expert_tp)
    if _current_sizes() == sizes:
        model_parallel_cuda_manual_seed(seed)
        return layout
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp if layout.vpp > 1 else None,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.expert_tp,
    )
    model_parallel_cuda_manual_seed(seed)
    return layout


@contextlib.contextmanager
def single_process(layout: Layout | None = None, *, seed: int = 1234) -> Iterator[Layout]:
    """A one-rank process group with megatron-core's parallel state, torn down on exit.

    Re-entrant: inside an active one (a test session, a CLI command calling a job) it only
    reseeds, and leaves the teardown to the outer one.
    """
    if parallel_state.model_parallel_is_initialized():
        model_parallel_cuda_manual_seed(seed)
        yield (layout or Layout()).resolve(dist.get_world_size())
        return
    owns_group = not dist.is_initialized()
    if owns_group:
        dist.init_process_group(
            runtime.distributed_backend(),
            init_method=f"tcp://127.0.0.1:{_free_port()}",
            world_size=1,
            rank=0,
        )
    try:
        yield init_parallel_state(layout or Layout(), seed=seed)
    finally:
        parallel_state.destroy_model_parallel()
        if owns_group:
            dist.destroy_process_group()

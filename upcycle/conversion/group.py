"""A group of Ray actors, one per rank, that run a conversion step together.

Why not Ray Train's worker group: a conversion is one collective call per rank, not a training
loop with reports and checkpoints, and when a rank dies the command must say which one and
leave nothing behind. So: one actor per rank in a placement group (PACK: ranks of one job stay
on as few nodes as fit), and for each job a fresh torch.distributed group over the first
`world` actors (gloo: conversion ranks hold their shards in host memory, so they ask for CPUs
only, also on GPU clusters) with megatron-core's parallel state for the job's layout. A group is
reused across jobs of any world size up to its size (the tests run many layouts on one group).
If any rank fails, every actor is killed (the others would wait in a collective forever) and
`RankFailed` names the rank and why: one whose process died if there is one (its peers then
fail in their collectives too), else the first to raise.
"""

from __future__ import annotations

import datetime
import os
import socket
import sys
from collections.abc import Callable
from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from rich.progress import Progress, TimeElapsedColumn

from upcycle.config import Layout


class RankFailed(RuntimeError):
    """A rank of a distributed conversion failed; `rank` says which."""

    def __init__(self, rank: int, world: int, cause: str):
        super().__init__(f"rank {rank} of {world} failed: {cause}")
        self.rank = rank


class ConversionRank:
    """One rank: runs a function inside a process group and megatron-core's parallel state."""

    def __init__(self, threads: int):
        import torch

        torch.set_num_threads(threads)

    def address(self) -> str:
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return f"{ray.util.get_node_ip_address()}:{port}"

    def pid(self) -> int:
        return os.getpid()

    def run(self, master: str, rank: int, layout: Layout, fn: Callable, args: tuple) -> Any:
        import torch.distributed as dist
        from megatron.core import parallel_state

        from upcycle.platform.distributed import init_parallel_state

        dist.init_process_group(
            "gloo",
            init_method=f"tcp://{master}",
            world_size=layout.world_size,
            rank=rank,
            timeout=datetime.timedelta(minutes=30),
        )
        try:
            init_parallel_state(layout)
            return fn(*args)
        finally:
            parallel_state.destroy_model_parallel()
            dist.destroy_process_group()


class RankGroup:
    """`size` conversion ranks as Ray actors in a placement group."""

    def __init__(
        self, size: int, *, cpus_per_rank: float = 1.0, threads: int = 1, wait_s: float = 600
    ):
        self.size = size
        self._pg = placement_group([{"CPU": cpus_per_rank}] * size, strategy="PACK")
        try:
            ray.get(self._pg.ready(), timeout=wait_s)
        except ray.exceptions.GetTimeoutError:
            remove_placement_group(self._pg)
            raise RuntimeError(
                f"{size} ranks of {cpus_per_rank} CPU each could not be placed within {wait_s:.0f} s "
                f"(the cluster has {ray.available_resources().get('CPU', 0):.0f} CPUs free); "
                "use fewer --workers or a larger cluster"
            ) from None
        actor = ray.remote(num_cpus=cpus_per_rank, max_restarts=0)(ConversionRank)
        self.actors = [
            actor.options(scheduling_strategy=PlacementGroupSchedulingStrategy(self._pg, i)).remote(
                threads
            )
            for i in range(size)
        ]
        self._closed = False

    def run(self, layout: Layout, fn: Callable, *args) -> list:
        """`fn(*args)` on ranks 0..world-1 of `layout` (resolved); their results in rank order."""
        world = layout.world_size
        if self._closed:
            raise RuntimeError("this rank group was closed after a failure; start a new one")
        if world > self.size:
            raise ValueError(f"the layout needs {world} ranks; this group has {self.size}")
        master = ray.get(self.actors[0].address.remote())
        refs = [
            a.run.remote(master, r, layout, fn, args) for r, a in enumerate(self.actors[:world])
        ]
        rank_of = {ref: r for r, ref in enumerate(refs)}
        pending = list(refs)
        with Progress(*Progress.get_default_columns(), TimeElapsedColumn(), transient=True,
                      disable=not sys.stdout.isatty()) as progress:  # fmt: skip
            task = progress.add_task(f"{fn.__name__} on {world} ranks", total=world)
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                if (failure := _failure(done[0])) is not None:
                    # a rank that dies makes its peers fail in their collectives: wait a moment
                    # for the others and name a rank whose process died before a peer's error
                    late, _ = ray.wait(pending, num_returns=len(pending), timeout=5)
                    failures = [(rank_of[done[0]], failure)]
                    failures += [(rank_of[r], f) for r in late if (f := _failure(r)) is not None]
                    rank, (_, cause) = min(failures, key=lambda x: (not x[1][0], x[0]))
                    self.close()
                    raise RankFailed(rank, world, cause)
                progress.advance(task)
        return ray.get(refs)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for a in self.actors:
            ray.kill(a)
        remove_placement_group(self._pg)

    def __enter__(self) -> RankGroup:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _failure(ref) -> tuple[bool, str] | None:
    """None if the call succeeded; else (whether the rank's process died, what happened)."""
    try:
        ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None) or e
        return False, f"{type(cause).__name__}: {cause}"
    except ray.exceptions.RayError as e:  # the actor died: killed, OOM-killed, node lost
        return True, f"its process died ({type(e).__name__})"
    return None

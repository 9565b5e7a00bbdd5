"""Run the megatron-core call one CPU patch covers, first without that patch, then with it.

    python tests/cpu_patch_probe.py PATCH_NAME

Prints `WITHOUT: <exception>` or `WITHOUT: ok`, then `WITH: ok` or `WITH: <exception>`.
A fresh process per patch, because patches cannot be taken back.
"""

from __future__ import annotations

import socket
import sys
import warnings

import torch
import torch.distributed as dist

warnings.filterwarnings("ignore")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init(rank: int = 0, world: int = 1, port: int | None = None) -> None:
    from megatron.core import parallel_state

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port or _port()}", rank=rank, world_size=world
    )
    parallel_state.initialize_model_parallel()


def _seed() -> None:
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(0)


def _tiny_moe():
    from upcycle.config import from_name
    from upcycle.moe.model import build_model

    return build_model(from_name("tiny-moe").replace(vocab_size=128, num_layers=1))


def _moe_forward() -> None:
    model = _tiny_moe()
    tokens = torch.randint(0, 128, (1, 8))
    model(tokens, torch.arange(8)[None], None)


def _split_sizes_all_to_all() -> None:
    import megatron.core.transformer.moe.moe_utils as moe_utils

    sizes = moe_utils.maybe_move_tensor_to_cpu(torch.tensor([3]), as_numpy=True)
    out = torch.empty(3)
    dist.all_to_all_single(out, torch.ones(3), output_split_sizes=sizes, input_split_sizes=sizes)


def _sp_norm() -> None:
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    from upcycle.config import from_name
    from upcycle.dense.megatron_config import to_transformer_config

    config = to_transformer_config(from_name("tiny-dense"))
    config.sequence_parallel = True
    norm = WrappedTorchNorm(config, 64)
    assert all(getattr(p, "sequence_parallel", False) for p in norm.parameters())


def _clip() -> None:
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    p = torch.nn.Parameter(torch.ones(4))
    p.grad = torch.full((4,), 10.0)
    clip_grad_by_total_norm_fp32([p], max_norm=1.0, total_norm=20.0)
    assert p.grad.max() < 1.0


def _grad_norm() -> None:
    from megatron.core.optimizer.clip_grads import get_grad_norm_fp32

    get_grad_norm_fp32([torch.ones(4)], norm_type=float("inf"))


def _bf16_optimizer() -> None:
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

    from upcycle.config import Layout, from_name
    from upcycle.dense.megatron_config import to_transformer_config
    from upcycle.training.step import build_chunks

    cfg = from_name("tiny-dense").replace(vocab_size=128, num_layers=1)
    tconfig = to_transformer_config(cfg, params_dtype=torch.bfloat16)
    chunks = build_chunks(cfg, Layout(), tconfig)
    opt = get_megatron_optimizer(OptimizerConfig(lr=1e-3, bf16=True), chunks)
    opt = opt.chained_optimizers[0] if hasattr(opt, "chained_optimizers") else opt
    assert isinstance(opt, Float16OptimizerWithFloat16Params), type(opt)
    main = opt.fp32_from_float16_groups[0][0]
    assert main.dtype == torch.float32, main.dtype


def _uneven_worker(rank: int, port: int, queue) -> None:
    from upcycle.platform.cpu import apply_cpu_patches

    _init(rank, 2, port)
    import megatron.core.tensor_parallel.mappings as mappings

    results = []
    for skip in (("uneven_gather",), ()):
        apply_cpu_patches(skip=skip)
        try:
            x = torch.full((3 - rank, 2), float(rank))
            out = mappings._gather_along_first_dim(x, dist.group.WORLD, output_split_sizes=[3, 2])
            assert out.shape == (5, 2) and out[3:].eq(1).all()
            results.append("ok")
        except Exception as e:  # noqa: BLE001 - reporting what megatron-core raised
            results.append(f"{type(e).__name__}: {str(e)[:120]}")
    if rank == 0:
        queue.put(results)
    dist.destroy_process_group()


def _uneven_gather() -> list[str]:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_uneven_worker, args=(r, _port_shared, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = queue.get(timeout=120)
    for p in procs:
        p.join(timeout=60)
    return results


PROBES = {
    "current_device": _moe_forward,
    "rng_tracker": _seed,
    "cuda_device_args": _grad_norm,
    "streams": _tiny_moe,
    "te_general_gemm_name": _moe_forward,
    "numpy_split_sizes": _split_sizes_all_to_all,
    "sequence_parallel_norm": _sp_norm,
    "clip_grads": _clip,
    "mixed_precision_optimizer": _bf16_optimizer,
}
_port_shared = 0


def main(name: str) -> None:
    global _port_shared
    from upcycle.platform.cpu import apply_cpu_patches

    if name == "uneven_gather":
        _port_shared = _port()
        without, with_ = _uneven_gather()
        print(f"WITHOUT: {without}\nWITH: {with_}")
        return
    apply_cpu_patches(skip={name})
    _init()
    if name != "rng_tracker":
        _seed()
    results = []
    for step in ("without", "with"):
        if step == "with":
            apply_cpu_patches()
        try:
            PROBES[name]()
            results.append("ok")
        except Exception as e:  # noqa: BLE001 - reporting what megatron-core raised
            results.append(f"{type(e).__name__}: {str(e)[:160]}")
    print(f"WITHOUT: {results[0]}\nWITH: {results[1]}", flush=True)
    dist.destroy_process_group()  # left to interpreter exit, gloo can abort the process


if __name__ == "__main__":
    main(sys.argv[1])

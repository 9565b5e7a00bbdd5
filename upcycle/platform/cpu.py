"""Make megatron-core 0.16.1 run on CPU with gloo (DESIGN.md decision 3).

megatron-core assumes CUDA in a handful of places. Each `Patch` below names the megatron-core call
it covers and why; `apply_cpu_patches()` applies them once per process, and only where no CUDA
device exists. tests/test_cpu_patches.py drops each patch in turn and shows the covered call still
fails without it, so a megatron-core upgrade that fixes one is noticed.

The TorchFunctionMode of the `cuda_device_args` patch is thread-local: call `apply_cpu_patches()`
in the thread that runs the model (Ray Train runs the training loop in its own thread).

Not available on CPU, and not patched: the distributed optimizer, TE's grouped GEMM (the experts
run as upcycle.moe.experts.FusedSequentialMLP), the flex (DeepEP) dispatcher.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch.overrides import TorchFunctionMode

from upcycle import runtime


@dataclass(frozen=True)
class Patch:
    name: str
    covers: str  # the megatron-core call that fails on CPU without it
    why: str
    apply: Callable[[], None]


def _current_device() -> None:
    torch.cuda.current_device = lambda: torch.device("cpu")


def _rng_tracker() -> None:
    import megatron.core.tensor_parallel.random as mrandom

    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    torch.cuda.manual_seed = lambda seed, *a, **k: torch.manual_seed(seed)
    torch.cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    torch.cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)


def _cpu(d):
    if isinstance(d, str) and d.startswith("cuda"):
        return torch.device("cpu")
    if isinstance(d, torch.device) and d.type == "cuda":
        return torch.device("cpu")
    return d


class _CudaArgsToCpu(TorchFunctionMode):
    """Rewrites device="cuda", .cuda() and .to("cuda") to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs:
            kwargs = {**kwargs, "device": _cpu(kwargs["device"])}
        name = getattr(func, "__name__", "")
        if name == "cuda":
            return args[0]
        if name == "to" and len(args) > 1 and isinstance(args[1], (str, torch.device)):
            args = (args[0], _cpu(args[1]), *args[2:])
        return func(*args, **kwargs)


_MODE_BY_THREAD: dict[int, _CudaArgsToCpu] = {}


def _cuda_device_args() -> None:
    tid = threading.get_ident()
    if tid not in _MODE_BY_THREAD:
        mode = _CudaArgsToCpu()
        mode.__enter__()
        _MODE_BY_THREAD[tid] = mode


@contextlib.contextmanager
def device_rewrites_paused():
    """Run a block without the `cuda_device_args` rewrite of this thread (a no-op where it is not
    active). The rewrite costs a Python call per torch call (~15% of a decode step of a small
    model); the serving forward pauses it because it creates no tensors on "cuda"."""
    if threading.get_ident() not in _MODE_BY_THREAD:
        yield
        return
    from torch.overrides import _pop_mode_temporarily

    with _pop_mode_temporarily():
        yield


class _NoStream:
    def __init__(self, *a, **k):
        pass

    def wait_stream(self, *a, **k):
        pass

    def wait_event(self, *a, **k):
        pass

    def record_event(self, *a, **k):
        return _NoEvent()

    def synchronize(self):
        pass


class _NoEvent(_NoStream):
    def record(self, *a, **k):
        pass

    def wait(self, *a, **k):
        pass

    def query(self):
        return True


def _streams() -> None:
    torch.cuda.Stream = _NoStream
    torch.cuda.Event = _NoEvent
    torch.cuda.current_stream = lambda *a, **k: _NoStream()
    torch.cuda.default_stream = lambda *a, **k: _NoStream()
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()
    torch.cuda.synchronize = lambda *a, **k: None


def _te_general_gemm_name() -> None:
    import megatron.core.transformer.moe.moe_utils as moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def _numpy_split_sizes() -> None:
    import megatron.core.transformer.moe.moe_utils as moe_utils
    import megatron.core.transformer.moe.token_dispatcher as dispatcher

    original = moe_utils.maybe_move_tensor_to_cpu

    @functools.wraps(original)
    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if as_numpy and torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.numpy()
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    moe_utils.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu


def _uneven_gather() -> None:
    import megatron.core.tensor_parallel.mappings as mappings
    import torch.distributed as dist

    gather, scatter = mappings._gather_along_first_dim, mappings._reduce_scatter_along_first_dim

    def _gather_along_first_dim(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group.size() == 1:
            return gather(input_, group, output_split_sizes, use_global_buffer)
        sizes = [int(n) for n in output_split_sizes]
        padded = input_.new_zeros((max(sizes), *input_.shape[1:]))
        padded[: input_.shape[0]] = input_
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded, group=group)
        return torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)], dim=0)

    def _reduce_scatter_along_first_dim(
        input_, group, input_split_sizes=None, use_global_buffer=False
    ):
        if input_split_sizes is None or group.size() == 1:
            return scatter(input_, group, input_split_sizes, use_global_buffer)
        total = input_.contiguous().clone()
        dist.all_reduce(total, group=group)
        sizes = [int(n) for n in input_split_sizes]
        return torch.split(total, sizes, dim=0)[group.rank()].contiguous()

    mappings._gather_along_first_dim = _gather_along_first_dim
    mappings._reduce_scatter_along_first_dim = _reduce_scatter_along_first_dim


def _sequence_parallel_norm() -> None:
    import copy

    import megatron.core.transformer.torch_norm as torch_norm

    original_new = torch_norm.WrappedTorchNorm.__new__

    def __new__(cls, config, *args, **kwargs):
        if not config.sequence_parallel:
            return original_new(cls, config, *args, **kwargs)
        plain = copy.copy(config)
        object.__setattr__(plain, "sequence_parallel", False)
        norm = original_new(cls, plain, *args, **kwargs)
        for p in norm.parameters():  # megatron-core all-reduces grads of params tagged so
            p.sequence_parallel = True
        return norm

    torch_norm.WrappedTorchNorm.__new__ = __new__


def _clip_grads() -> None:
    import megatron.core.optimizer.clip_grads as clip_grads
    import megatron.core.optimizer.optimizer as optimizer

    def clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
        if isinstance(parameters, torch.Tensor):
            parameters = [parameters]
        attr = "decoupled_grad" if use_decoupled_grad else "grad"
        grads = [getattr(p, attr) for p in parameters if getattr(p, attr, None) is not None]
        coeff = max_norm / (total_norm + 1.0e-6)
        if coeff < 1.0 and grads:
            torch._foreach_mul_(grads, coeff)

    clip_grads.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_fp32
    optimizer.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_fp32


class _CudaTypeNames(TorchFunctionMode):
    """`tensor.type()` answers with the CUDA name ("torch.cuda.BFloat16Tensor")."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            return result.replace("torch.", "torch.cuda.", 1)
        return result


def _mixed_precision_optimizer() -> None:
    import megatron.core.optimizer.optimizer as optimizer

    cls = optimizer.Float16OptimizerWithFloat16Params
    original = cls.__init__

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        with _CudaTypeNames():
            original(self, *args, **kwargs)

    cls.__init__ = __init__


PATCHES: tuple[Patch, ...] = (
    Patch("current_device", "torch.cuda.current_device() in TopKRouter.gating, DDP buffers",
          "raises 'Torch not compiled with CUDA enabled'", _current_device),
    Patch("rng_tracker", "tensor_parallel.random.model_parallel_cuda_manual_seed / CudaRNGStatesTracker",
          "the TP RNG tracker saves and restores CUDA generator state", _rng_tracker),
    Patch("cuda_device_args", "device='cuda' / .cuda() at 60+ sites (get_megatron_optimizer, clip_grads, ...)",
          "hard-coded CUDA allocations", _cuda_device_args),
    Patch("streams", "torch.cuda.Stream/Event in MoEAlltoAllTokenDispatcher.__init__ and the schedules",
          "CUDA streams cannot be created without CUDA", _streams),
    Patch("te_general_gemm_name", "moe_utils.RouterGatingLinearFunction.forward",
          "0.16.1 leaves te_general_gemm undefined when TE is absent (NameError)", _te_general_gemm_name),
    Patch("numpy_split_sizes", "moe_utils.maybe_move_tensor_to_cpu(as_numpy=True) in the alltoall dispatcher",
          "CPU split sizes stay tensors, which all_to_all_single rejects", _numpy_split_sizes),
    Patch("uneven_gather", "tensor_parallel.mappings._gather/_reduce_scatter_along_first_dim with split sizes",
          "gloo cannot all_gather tensors of different sizes (alltoall dispatcher with etp > 1)", _uneven_gather),
    Patch("sequence_parallel_norm", "transformer.torch_norm.WrappedTorchNorm with sequence_parallel",
          "asserts 'sequence parallel not supported by torch LayerNorm'", _sequence_parallel_norm),
    Patch("clip_grads", "optimizer.clip_grads.clip_grad_by_total_norm_fp32",
          "asserts grad.type() == 'torch.cuda.FloatTensor'", _clip_grads),
    Patch("mixed_precision_optimizer", "optimizer.Float16OptimizerWithFloat16Params.__init__ (bf16 training)",
          "sorts params by param.type() into torch.cuda.{BFloat16,Half,Float}Tensor, else TypeError",
          _mixed_precision_optimizer),
)  # fmt: skip

_applied: set[str] = set()


def apply_cpu_patches(skip: Iterable[str] = ()) -> list[str]:
    """Apply every patch not in `skip` (once per process; the device-args one once per thread).

    A no-op where CUDA exists. Returns the names applied so far.
    """
    if runtime.has_cuda():
        return []
    skip = set(skip)
    unknown = skip - {p.name for p in PATCHES}
    if unknown:
        raise ValueError(
            f"unknown CPU patch(es) {sorted(unknown)}; known: {[p.name for p in PATCHES]}"
        )
    for patch in PATCHES:
        if patch.name in skip:
            continue
        if patch.name not in _applied or patch.name == "cuda_device_args":
            patch.apply()
            _applied.add(patch.name)
    return sorted(_applied)

"""What this process can run on: the one place that asks about CUDA and Transformer Engine.

Model code asks `has_cuda()` and `te_available()` instead of naming "cuda", so that the CPU
compatibility layer (`upcycle.platform.cpu`) cannot hide a device bug of ours.
"""

from __future__ import annotations

import functools

import torch

# The environment of a process that holds a serving engine (Ray actors' `runtime_env`). OpenMP's
# worker threads spin for ~3 ms after a parallel region before they sleep (libgomp:
# OMP_WAIT_POLICY=ACTIVE, with GOMP_SPINCOUNT's 300,000 spins as the limit). A decode step is
# ~50 short parallel regions (inductor's kernels, oneDNN's GEMMs): with libgomp's defaults the
# second thread sleeps between them and every wake-up costs tens of microseconds (moe-bench bf16,
# 2 threads, compiled: 3.7 -> 1.9 ms a step at 1 stream, 8.9 -> 5.5 at 16); ACTIVE alone would
# spin for minutes after the last request. libgomp reads them when it loads (with torch), so
# they are set where the process starts, never from inside it.
ENGINE_THREAD_ENV = {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "300000"}


class MissingDependencyError(RuntimeError):
    """An optional dependency (a GPU, Transformer Engine) is needed and absent."""


def has_cuda() -> bool:
    # The real answer even after the CPU layer is applied (it does not touch is_available).
    return torch.cuda.is_available()


def device() -> torch.device:
    """Where this process computes: its CUDA device, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if has_cuda() else torch.device("cpu")


def device_name() -> str:
    return torch.cuda.get_device_name() if has_cuda() else "cpu"


def distributed_backend() -> str:
    return "nccl" if has_cuda() else "gloo"


@functools.cache
def bf16_supported() -> bool:
    """True where bf16 matrix work is native: a CUDA device, or a CPU with AVX512-BF16 or AMX
    tiles for oneDNN's bf16 kernels (elsewhere torch emulates bf16, slower than fp32)."""
    if has_cuda():
        return True
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return bool(native and torch.backends.mkldnn.is_available())


NO_BF16 = (
    "bf16 needs a CUDA GPU or a CPU with AVX512-BF16/AMX; this one has neither (bf16 would be "
    "emulated, slower than fp32)"
)


@functools.cache
def te_available() -> bool:
    """True where Transformer Engine imports and a CUDA device exists (the TE layer spec path)."""
    if not has_cuda():
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # a broken TE install raises more than ImportError
        return False
    return True


def require_te(feature: str) -> None:
    """Raise a clear error when `feature` needs Transformer Engine on a GPU and it is absent."""
    if not has_cuda():
        raise MissingDependencyError(
            f"{feature} needs a CUDA GPU with Transformer Engine; this machine has no CUDA device"
        )
    if not te_available():
        raise MissingDependencyError(
            f"{feature} needs Transformer Engine: pip install transformer-engine[pytorch] "
            "on a CUDA machine (never on a CPU-only one)"
        )

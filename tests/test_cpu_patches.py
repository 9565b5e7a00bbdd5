"""Each CPU patch is still needed by megatron-core 0.16.1, and makes its call work.

If megatron-core fixes one of these, its test fails here: drop the patch from
upcycle/platform/cpu.py then.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from upcycle.platform.cpu import PATCHES

PROBE = Path(__file__).with_name("cpu_patch_probe.py")
EXPECTED_FAILURE = {
    "current_device": "Torch not compiled with CUDA",
    "rng_tracker": "Torch not compiled with CUDA",
    "cuda_device_args": "Torch not compiled with CUDA",
    "streams": "requires CUDA",
    "te_general_gemm_name": "NameError: name 'te_general_gemm' is not defined",
    "numpy_split_sizes": "TypeError",
    "uneven_gather": "invalid tensor size",
    "sequence_parallel_norm": "sequence parallel not supported",
    "clip_grads": "AssertionError",
    "mixed_precision_optimizer": "TypeError: Wrapped parameters must be one of",
}


def test_every_patch_has_a_probe():
    assert {p.name for p in PATCHES} == set(EXPECTED_FAILURE)


@pytest.mark.parametrize("name", sorted(EXPECTED_FAILURE))
def test_patch_is_needed_and_works(name):
    out = subprocess.run(
        [sys.executable, str(PROBE), name], capture_output=True, text=True, timeout=300,
        cwd=PROBE.parent,
    )  # fmt: skip
    lines = dict(line.split(": ", 1) for line in out.stdout.splitlines() if line.startswith("WITH"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert EXPECTED_FAILURE[name] in lines["WITHOUT"], lines
    assert lines["WITH"] == "ok", lines

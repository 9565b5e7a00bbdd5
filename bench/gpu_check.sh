#!/usr/bin/env bash
# The one prepared GPU check (1 x H100/H200, Python 3.12 with torch; no megatron-core, no TE there).
#
# Here, once:  echo /.whl/ >> .git/info/exclude
#              python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#                  --implementation cp -d .whl megatron-core==0.16.1
# Then run it on the GPU machine with `.whl` carried:  bash bench/gpu_check.sh
# It prints tokens/s and MFU of a bf16 training step of a ~1B-active MoE (bench/gpu_train_step.py),
# then the serving engine's decode tokens/s and time to first token of the same MoE at 1 and 16
# streams (bench/gpu_decode.py).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/megatron_core-*.whl
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, megatron.core; print('torch', torch.__version__, 'megatron-core', megatron.core.__version__)"
timeout 420 python3 bench/gpu_train_step.py --preset moe-a1b --batch 4 --seq 2048 --steps 5
timeout 300 python3 bench/gpu_decode.py --preset moe-a1b --streams 1 16

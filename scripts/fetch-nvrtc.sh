#!/usr/bin/env bash
# Fetches NVRTC (CUDA 13.0, the runtime compiler the GPU backend loads) from
# PyPI into .whl/nvrtc (git-ignored), so that the kernel source can be
# compiled without a GPU or a CUDA installation:
#   scripts/fetch-nvrtc.sh
#   LD_LIBRARY_PATH=$PWD/.whl/nvrtc/nvidia/cu13/lib cargo test -p sofo-tensor --features cuda kernels_compile
set -euo pipefail
cd "$(dirname "$0")/.."
lib=.whl/nvrtc/nvidia/cu13/lib/libnvrtc.so.13
[ -f "$lib" ] && exit 0
mkdir -p .whl
python3 -m pip download --quiet --no-deps nvidia-cuda-nvrtc==13.0.88 -d .whl
python3 -m zipfile -e .whl/nvidia_cuda_nvrtc-13.0.88-*.whl .whl/nvrtc
test -f "$lib"

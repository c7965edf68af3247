#!/usr/bin/env bash
# GPU benchmark in two halves, because the GPU machine has no Rust toolchain:
#   benches/gpu.sh build   here: compiles the `cuda` binary into target-cuda/ (CUDA from
#                          ../shared/tools/cuda-env.sh when no toolkit is installed)
#   benches/gpu.sh run     on the GPU machine (with target-cuda/release/finserve carried over):
#                          benches/gpu.py, finserve bf16 vs transformers bf16 at concurrency 1, 16, 64
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  build)
    if ! command -v nvcc >/dev/null; then
      # shellcheck disable=SC1091
      source ../shared/tools/cuda-env.sh
    fi
    cargo build --release --features cuda --target-dir target-cuda
    ls -l target-cuda/release/finserve
    ;;
  run)
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
    # The binary links CUDA 13's cuBLAS/cuRAND/cudart; on a machine without a CUDA toolkit they come
    # from PyTorch's `nvidia` wheels.
    if nvidia_dir=$(python3 -c 'import nvidia, os; print(os.path.dirname(nvidia.__file__))' 2>/dev/null); then
      export LD_LIBRARY_PATH="$nvidia_dir/cu13/lib:${LD_LIBRARY_PATH:-}"
    fi
    ldd target-cuda/release/finserve | grep 'not found' && exit 1
    python3 benches/gpu.py "${@:2}"
    ;;
  *)
    echo "usage: benches/gpu.sh build | run [gpu.py options]" >&2
    exit 2
    ;;
esac

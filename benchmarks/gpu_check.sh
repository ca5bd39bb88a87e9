#!/usr/bin/env bash
# The one command for a GPU machine: tests on the device, then every method's paper recipe (benchmarks/gpu_check.py).
# First, where ../shared exists: python -m benchmarks.gpu_check pack   (then carry .cache/gpu-check)
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 -m benchmarks.gpu_check run "$@"  # python3: the GPU image names its torch python so

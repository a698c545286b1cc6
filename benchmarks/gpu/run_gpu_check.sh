#!/usr/bin/env bash
# GPU check for issue 11 -- NOT RUN YET: written without a GPU (the dev machines have none).
#
# On an x86 machine with one NVIDIA GPU (standing in for a Jetson's TensorRT API), from the repo root:
#
#     OUT=/tmp/gpu-out bash benchmarks/gpu/run_gpu_check.sh BUNDLE_DIR [BUNDLE_DIR ...]
#
# BUNDLE_DIRs are bundles exported on a CPU machine (`molmo-edge export ...`): e.g. the bundled
# checkpoint's fp32 and int8 bundles and a release-width (4B-shaped) one (issue 9's
# benchmarks/export_4b.py makes one). For each bundle the script:
#   1. installs TensorRT, cuda-python and onnxruntime-gpu from PyPI into its own venv (once);
#   2. builds TensorRT engines into the bundle (`molmo-edge build-engines`);
#   3. times act() per stage on the TensorRT backend (CUDA-graph replay), onnxruntime's CUDA
#      provider (CUDA graphs) and onnxruntime CPU, each in its own process, alternated rounds;
#   4. checks parity of every GPU backend against the CPU bundle (same observation and noise).
# Results: $OUT/<bundle>/report.json and $OUT/summary.md. Exit status 1 when a parity check fails.
set -euo pipefail

OUT="${OUT:-.cache/gpu-check}"
VENV="${VENV:-.cache/gpu-venv}"
ROUNDS="${ROUNDS:-3}"
ITERATIONS="${ITERATIONS:-30}"
[ "$#" -ge 1 ] || { echo "usage: OUT=dir $0 BUNDLE_DIR [BUNDLE_DIR ...]" >&2; exit 2; }
nvidia-smi -L || { echo "error: no NVIDIA GPU answers (nvidia-smi)" >&2; exit 2; }
mkdir -p "$OUT"

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  # runtime dependencies only (the device side never imports torch); TensorRT wheels come from PyPI
  # (tensorrt-cu12 pulls its libs from pypi.nvidia.com) and onnxruntime-gpu replaces onnxruntime.
  "$VENV/bin/pip" install -q "numpy<3" "onnx>=1.16" "tokenizers>=0.15" "safetensors>=0.4" "msgpack>=1.0" \
    "click>=8.1" "rich>=13" "pyserial>=3.5" "dynamixel-sdk>=3.7.31" "python-can>=4.3" \
    "tensorrt-cu12>=10.3" "cuda-python>=12.2" "onnxruntime-gpu>=1.20"
fi
PY="$VENV/bin/python"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" - <<'PYEOF'
import onnxruntime as ort, tensorrt as trt
print("tensorrt", trt.__version__, "| onnxruntime", ort.__version__, ort.get_available_providers())
PYEOF

status=0
for bundle in "$@"; do
  name="$(basename "$bundle")"
  mkdir -p "$OUT/$name"
  echo "== $name: build-engines"
  ( time "$PY" -m molmoact2_edge.cli.main build-engines "$bundle" ) 2>&1 | tee "$OUT/$name/build.log"
  echo "== $name: per-stage latency and parity"
  "$PY" benchmarks/gpu/gpu_stages.py "$bundle" --rounds "$ROUNDS" --iterations "$ITERATIONS" \
    --out "$OUT/$name/report.json" | tee -a "$OUT/summary.md" || status=1
done
exit $status

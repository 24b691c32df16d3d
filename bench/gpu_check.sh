#!/usr/bin/env bash
# One-call GPU check of the CUDA kernels (for the lent device machine, or any CUDA box):
# build tbg with TBG_CUDA=on, run the CUDA checks against the reference, then the GPU benchmarks.
# Logs go to $OUT (default ./gpu_check_out). Usage: bash bench/gpu_check.sh [--no-bench]
set -uo pipefail
PY=${PYTHON:-python3}
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
# One architecture: the device's own (halves the .cu compile time of the default 80 + 90).
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")}
{ date -u; nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv; $PY -c "import torch; print('torch', torch.__version__)"; } 2>&1 | tee "$OUT/env.log"

t0=$(date +%s)
if ! TBG_CUDA=on $PY -m pip install -q --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1; then
  tail -50 "$OUT/build.log"; echo "BUILD FAILED"; exit 1
fi
echo "build: $(( $(date +%s) - t0 )) s"
grep -i "warning" "$OUT/build.log" | head -20

status=0
$PY bench/cuda_smoke.py --check-only 2>&1 | tee "$OUT/cuda_smoke_check.log" || status=1
# The CUDA tests (EGNN ops, divergence / JVP); these files need no OpenMM, which the GPU image lacks.
$PY -m pytest -q tests/test_egnn_ops.py tests/test_divergence.py -k cuda 2>&1 | tee "$OUT/pytest_cuda.log" | tail -15 || status=1
if [ "${1:-}" != "--no-bench" ]; then
  $PY bench/cuda_smoke.py --bench-only 2>&1 | tee "$OUT/cuda_bench.log" || status=1
  if [ -f bench/bench_egnn.py ]; then
    timeout 240 $PY bench/bench_egnn.py --device cuda 2>&1 | tee "$OUT/bench_egnn_cuda.log" | tail -30 || status=1
  fi
  timeout 300 $PY -u bench/bench_divergence.py --device cuda --batch 64 --dip-batch 32 --repeats 5 2>&1 \
    | tee "$OUT/bench_divergence_cuda.log" | tail -20 || status=1
fi
exit $status

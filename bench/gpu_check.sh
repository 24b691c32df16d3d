#!/usr/bin/env bash
# One-call GPU check (the lent device machine, or any CUDA box), within one time budget (default 470 s,
# GPU_CHECK_BUDGET): build tbg with TBG_CUDA=on, run every CUDA test - the Triton kernels natively with
# TBG_TRITON=divergence,egnn (their own tests, and the .cu kernels' EGNN and divergence tests served by
# Triton), then the .cu kernels (cuda_smoke checks, pytest -k cuda) - then the GPU benchmarks: Triton vs
# batched vs published divergence, the EGNN training step Triton vs .cu vs reference (both with the fp32 /
# TF32 mm ceilings), TF32's effect on dlogp, the tile sweeps, the .cu op benchmark. Steps run in that
# order of priority; a step that does not fit the time left is skipped and says so. Logs go to $OUT
# (default ./gpu_check_out), at most 8 files; the last lines printed (and $OUT/summary.txt) are a table:
# step, status, seconds, result.
# The protocol around it (what a pass means, how results are recorded): docs/gpu.md.
#
#   bash bench/gpu_check.sh                 # on the GPU machine
#   bash bench/gpu_check.sh --cpu-dry-run   # here: the same steps on CPU, Triton under the interpreter,
#                                           # tiny sizes, no build, to catch mistakes before a GPU is spent
# TF32's effect on dlogp needs a trained alanine-dipeptide model and its atom features, which the GPU
# image (no OpenMM) cannot make: create them first, then carry the folder with the call
# (device tool: carry ["bench_tf32_run"]):
#   python bench/bench_tf32.py --save-features bench_tf32_run/features.pt   # trains bench_tf32_run/model.pt
set -uo pipefail
DRY=0
[ "${1:-}" = "--cpu-dry-run" ] && DRY=1
PY=${PYTHON:-python3}
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
: >"$OUT/summary.txt"
export PYTHONUNBUFFERED=1 CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
START=$(date +%s)
DEADLINE=$((START + ${GPU_CHECK_BUDGET:-470}))
FAILED=0

record() {  # record STEP STATUS SECONDS NOTE
  printf '%-22s %-8s %5s  %s\n' "$1" "$2" "$3" "$4" >>"$OUT/summary.txt"
  case $2 in ok|skipped) ;; *) FAILED=1 ;; esac
}

# step NAME LOG MAX_SECONDS NOTE_COMMAND -- COMMAND...: run COMMAND (appending to $OUT/LOG) with a time
# limit of MAX_SECONDS or what is left of the budget; NOTE_COMMAND reads the step's log part on stdin.
step() {
  local name=$1 log=$2 max=$3 note_cmd=$4
  shift 5
  local left=$((DEADLINE - $(date +%s) - 15))
  if ((left < 20)); then
    record "$name" skipped 0 "no time left in the budget"
    return
  fi
  local limit=$((max < left ? max : left)) t0 part
  t0=$(date +%s)
  part=$(mktemp)
  echo "== $name (limit ${limit}s): $*" | tee -a "$OUT/$log"
  timeout --kill-after=10 "$limit" "$@" >"$part" 2>&1
  local rc=$?
  cat "$part" >>"$OUT/$log"
  tail -5 "$part"
  local status=ok
  if ((rc == 124 || rc == 137)); then status=timeout; elif ((rc != 0)); then status=FAIL; fi
  local notes
  notes=$(bash -c "$note_cmd" <"$part" | cut -c1-110)
  record "$name" "$status" "$(($(date +%s) - t0))" "$(head -1 <<<"$notes")"
  tail -n +2 <<<"$notes" | while IFS= read -r line; do printf '%-22s %-8s %5s  %s\n' "" "" "" "$line" >>"$OUT/summary.txt"; done
  rm -f "$part"
}

PYTEST_NOTE='grep -E "passed|failed|error|skipped|deselected|no tests ran" | tail -1'
{
  date -u
  if ((DRY)); then echo "CPU dry run: no GPU, Triton under the interpreter"; else
    nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,memory.total --format=csv; fi
  $PY -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__)"
  $PY -c "import triton; print('triton', triton.__version__)" || echo "triton: not importable"
} 2>&1 | tee "$OUT/env_build.log"

if ((DRY)); then
  record build skipped 0 "dry run: the existing CPU build"
  export TRITON_INTERPRET=1  # read when triton is imported: the kernels run on CPU tensors
  DEVICE=cpu
else
  # One architecture: the device's own (halves the .cu compile time of the default 80 + 90).
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")}
  step build env_build.log 300 'grep -ci warning | sed "s/$/ warnings/"' -- \
    env TBG_CUDA=on $PY -m pip install -q --no-build-isolation --no-deps -e .
  if ! $PY -c "import tbg" 2>/dev/null; then  # the Triton checks need only the CPU library
    step "build (cpu only)" env_build.log 200 'tail -1' -- \
      env TBG_CUDA=off $PY -m pip install -q --no-build-isolation --no-deps -e .
  fi
  DEVICE=cuda
fi
TBG_TRITON=divergence,egnn $PY -c "from tbg.cli import main; main(['info'])" 2>&1 | tee -a "$OUT/env_build.log" | tail -7

# -- tests: Triton natively (needs nothing but the CPU library), then the .cu kernels ----------------
if ((DRY)); then  # the CUDA selection (all skipped here), then a few Triton cases on CPU
  step "triton tests -k cuda" triton_tests.log 120 "$PYTEST_NOTE" -- env TBG_TRITON=divergence,egnn \
    $PY -m pytest -q -p no:cacheprovider tests/test_triton_divergence.py tests/test_triton_egnn.py -k cuda
  step "triton tests (cpu)" triton_tests.log 240 "$PYTEST_NOTE" -- \
    $PY -m pytest -q -p no:cacheprovider tests/test_triton_divergence.py tests/test_triton_egnn.py \
    -k "(jvp_matches and dtype0 and cpu) or (match_cpp_kernel and sizes0 and cpu) or no_host"
else  # the Triton tests, and the .cu kernels' tests with Triton as the registered CUDA implementation
  # (test_egnn_ops' bad-input test expects host-side messages for a bad mol_ptr, which Triton, like the .cu
  # kernels, checks on the device: its device-side assertion would end the CUDA context of the run)
  step "triton tests -k cuda" triton_tests.log 300 "$PYTEST_NOTE" -- env TBG_TRITON=divergence,egnn \
    $PY -m pytest -q -p no:cacheprovider tests/test_triton_divergence.py tests/test_triton_egnn.py \
    tests/test_divergence.py tests/test_egnn_ops.py -k cuda --deselect "tests/test_egnn_ops.py::test_bad_inputs_raise[cuda]"
fi
if ((DRY)); then
  record "cuda_smoke checks" skipped 0 "needs a GPU"
else
  step "cuda_smoke checks" checks.log 90 'grep -E "CHECKS" | tail -1' -- $PY bench/cuda_smoke.py --check-only
fi
# (these files need no OpenMM, which the GPU image lacks)
# (test_egnn_ops.py last: its bad-input test may end the CUDA context with a device-side assertion)
step ".cu + batched tests" checks.log 150 "$PYTEST_NOTE" -- \
  $PY -m pytest -q -p no:cacheprovider tests/test_divergence.py tests/test_egnn_ops.py -k cuda

# -- benchmarks ----------------------------------------------------------------------------------------
TF32_NOTE='grep -E "^divergence GEMMs|^(fp32|tf32)" | cut -c1-80'
TRITON_NOTE='grep -E "^(ala2|dipeptides) triton"'
EGNN_NOTE='grep -E "^(ala2|transfer) training triton"'
SWEEP_NOTE='grep -E "^[a-z ]+: Triton tile|^ +tangents|^ +[0-9]+ +[0-9]+ +[0-9]+ +[0-9]" | cut -c1-110'
EGNN_SWEEP_NOTE='grep -E "training step: Triton tile|^ +receivers|^ +[0-9]+ +[0-9]+ +[0-9]+ +[0-9]" | cut -c1-110'
if ((DRY)); then
  step "bench divergence" bench_divergence.log 240 "$TRITON_NOTE" -- env TBG_TRITON=divergence \
    $PY bench/bench_divergence.py --device cpu --triton --dry-run --batch 2 --dip-batch 2 --grad-batch 2 --repeats 1
  step "bench egnn triton" bench_egnn.log 150 "$EGNN_NOTE" -- \
    $PY bench/bench_egnn.py --device cpu --triton --dry-run --case a d --repeats 1
  step "bench tf32 dlogp" bench_tf32.log 120 "$TF32_NOTE" -- \
    $PY bench/bench_tf32.py --dry-run
  step "triton tile sweep" bench_divergence.log 120 "$SWEEP_NOTE" -- \
    $PY bench/bench_divergence.py --device cpu --sweep --dry-run --batch 1 --dip-batch 1 --repeats 1
  step "egnn tile sweep" bench_egnn.log 120 "$EGNN_SWEEP_NOTE" -- \
    $PY bench/bench_egnn.py --device cpu --sweep --dry-run --repeats 1
  record "cuda_smoke bench" skipped 0 "needs a GPU"
else
  step "bench divergence" bench_divergence.log 150 "$TRITON_NOTE" -- env TBG_TRITON=divergence \
    $PY bench/bench_divergence.py --device cuda --triton --batch 64 --dip-batch 32 --repeats 5 --skip gradient
  step "bench egnn triton" bench_egnn.log 150 "$EGNN_NOTE" -- \
    $PY bench/bench_egnn.py --device cuda --triton --case a d --repeats 5
  if [ -f bench_tf32_run/model.pt ] && [ -f bench_tf32_run/features.pt ]; then
    step "bench tf32 dlogp" bench_tf32.log 90 "$TF32_NOTE" -- \
      $PY bench/bench_tf32.py --device cuda --checkpoint bench_tf32_run/model.pt --features bench_tf32_run/features.pt
  else
    record "bench tf32 dlogp" skipped 0 "carry bench_tf32_run/ (model.pt, features.pt): see the header"
  fi
  step "triton tile sweep" bench_divergence.log 120 "$SWEEP_NOTE" -- \
    $PY bench/bench_divergence.py --device cuda --sweep --batch 64 --dip-batch 32 --repeats 3
  step "egnn tile sweep" bench_egnn.log 120 "$EGNN_SWEEP_NOTE" -- \
    $PY bench/bench_egnn.py --device cuda --sweep --repeats 3
  step "cuda_smoke bench" bench_egnn.log 120 'grep -E "forward\+backward" | tail -2' -- $PY bench/cuda_smoke.py --bench-only
fi

echo
echo "== summary ($(($(date +%s) - START)) s of ${GPU_CHECK_BUDGET:-470}; logs in $OUT)"
printf '%-22s %-8s %5s  %s\n' step status sec result
cat "$OUT/summary.txt"
exit $FAILED

#!/usr/bin/env bash
# Checks the CUDA path on a GPU machine (no network: python3 with torch+CUDA, transformers, pytest,
# pybind11, scikit-build-core, cmake, ninja and nvcc already installed). From the repository root:
#
#     OUT=/some/dir bash benchmarks/gpu_check.sh        # OUT defaults to /tmp/m2r2_gpu_check
#
# Steps, most important first; each has its own time limit, so the whole script ends within about
# 9.5 minutes (SCRIPT_S, default 570 s) however the steps fail, and each appends its result line to
# summary.txt as soon as it ends (a line "<step>: started" is written first, so the summary of a run that
# was stopped from outside says which step was running; the logs are written as the steps run):
#   1. env       the machine: GPU, driver, CUDA, torch (env.log)
#   2. gpu-torch the gpu-marked tests from the source tree, torch copy engine (tests_torch.log): device
#                placement of the predictors, host syncs per token, stream/event ordering (pool fill,
#                slot reuse, cuda:1 when there are two devices), the pinned store, the stall log, demand
#                loads on their own stream overtaking queued prefetches, prefill streaming
#   3. build     pip install with the CUDA copy engine required (M2R2_MOE_CUDA=ON), else AUTO (build.log)
#   4. gpu-native the native core's tests and the gpu-marked tests again, both native parts required and
#                the native copy engine in use (tests_native.log)
#   5. bandwidth the copy engines' host→device bandwidth against one large pinned copy_ (bandwidth.log,
#                bandwidth.json)
#   5b. prefill  the profiler's prefill mode on the GPU (built-in model, half of all experts cached): prompt
#                forwards offloaded against the original, logits compared (prefill.log, prefill.json)

#   5c. expand   compressed experts: the expansion kernel's twin tests (tests_expand.log) and one Mixtral-8x7B
#                expert copied + expanded (int8, int4) against its plain bf16 copy (expand.log, expand.json)
#   6. replay    offloaded decoding per predictor on Mixtral-8x7B expert geometry (4 MoE layers, synthetic
#                weights, the built-in model's routing replayed: benchmarks/gpu_replay.py), in the time
#                left (replay.log, replay.json); skipped when under 60 s are left
set -u -o pipefail
OUT="${OUT:-/tmp/m2r2_gpu_check}"
SCRIPT_S="${SCRIPT_S:-570}"
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
VENV="${VENV:-/tmp/m2r2-gpu-venv}"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
started() { echo "$1: started at $SECONDS s" >> "$SUMMARY"; }
result() { echo "$1: $2 (at $SECONDS s)" | tee -a "$SUMMARY"; }
left() { echo $(( SCRIPT_S - SECONDS )); }
# run_for LIMIT_S LOG CMD...: the command under `timeout`, its output appended to LOG; the limit is cut to
# what is left of SCRIPT_S, and under 5 s left the command is not started (rc 125). rc 124 = timed out.
run_for() {
  local limit=$1 log=$2; shift 2
  [ "$limit" -gt "$(left)" ] && limit=$(left)
  if [ "$limit" -lt 5 ]; then echo "not run: $limit s left" >>"$log"; return 125; fi
  timeout -k 5 "$limit" "$@" >>"$log" 2>&1
}
outcome() {  # $1 = rc
  case "$1" in 0) echo "ok" ;; 124|137) echo "TIMED OUT" ;; 125) echo "NOT RUN (no time left)" ;;
    *) echo "FAILED rc=$1" ;; esac
}

# -- 1. env ---------------------------------------------------------------------------------------------
started env
ENV_LOG="$OUT/env.log"
: > "$ENV_LOG"
{ date -u; uname -a; } >>"$ENV_LOG" 2>&1
run_for 15 "$ENV_LOG" nvidia-smi
run_for 10 "$ENV_LOG" nvcc --version
run_for 10 "$ENV_LOG" cmake --version
run_for 45 "$ENV_LOG" "$PY" -c "import sys, torch; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available(), torch.cuda.device_count(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')"
run_for 20 "$ENV_LOG" "$PY" -m pip list
result env "$(grep -m1 '^torch ' "$OUT/env.log" || echo 'torch not importable')"

# -- 2. gpu-marked tests, torch copy engine, source tree ---------------------------------------------
started gpu-torch
export PYTHONUNBUFFERED=1
M2R2_MOE_NO_EXT=1 run_for 120 "$OUT/tests_torch.log" "$PY" -m pytest -q -rs -p no:cacheprovider -m gpu \
  tests/test_gpu_runtime.py tests/test_gpu_streams.py tests/test_gpu.py
rc=$?
result gpu-torch "$(outcome $rc): $(tail -1 "$OUT/tests_torch.log")"

# -- 3. build ---------------------------------------------------------------------------------------------
# A venv that sees the interpreter's packages; where it cannot be made (python3 itself a venv), the
# interpreter itself. pip --no-build-isolation --no-deps --no-index: nothing is downloaded.
started build
VPY="$PY"; PIP_EXTRA=""
if run_for 30 "$OUT/build.log" "$PY" -m venv --system-site-packages "$VENV" &&
   run_for 30 "$OUT/build.log" "$VENV/bin/python" -c "import torch, scikit_build_core, pybind11"; then
  VPY="$VENV/bin/python"
elif timeout 20 "$PY" -m pip install --help 2>/dev/null | grep -q -- --break-system-packages; then
  PIP_EXTRA="--break-system-packages"
fi
echo "installing with $VPY $PIP_EXTRA" >>"$OUT/build.log"
build() {  # $1 = M2R2_MOE_CUDA mode, $2 = time limit
  echo "=== pip install, M2R2_MOE_CUDA=$1 ===" >>"$OUT/build.log"
  M2R2_MOE_CUDA="$1" run_for "$2" "$OUT/build.log" "$VPY" -m pip install -v --no-build-isolation --no-deps \
    --no-index $PIP_EXTRA .
}
build ON 150
rc=$?
if [ $rc -eq 0 ]; then
  result build "ok with the CUDA part required"
elif [ "$(left)" -gt 240 ] && build AUTO 90; then
  result build "$(outcome $rc) with M2R2_MOE_CUDA=ON; ok with AUTO (see build.log)"
else
  result build "$(outcome $rc) with M2R2_MOE_CUDA=ON; AUTO failed or not tried (see build.log)"
fi
# Outside the repository, so that the installed copy (not the source tree) is imported.
(cd /tmp && run_for 30 "$OUT/build.log" "$VPY" -c "import m2r2_moe._ext as e; print('ext: HAS_EXT', e.HAS_EXT, 'HAS_CUDA_EXT', e.HAS_CUDA_EXT, 'probe', repr(e.cuda_probe()))")
result ext "$(grep '^ext: ' "$OUT/build.log" | tail -1)"

# -- 4. native parts required, native copy engine in use ----------------------------------------------
started gpu-native
M2R2_MOE_REQUIRE_EXT=1 M2R2_MOE_REQUIRE_CUDA_EXT=1 M2R2_MOE_NATIVE_CUDA=1 run_for 100 "$OUT/tests_native.log" \
  "$VPY" -m pytest -q -rs -p no:cacheprovider tests/test_ext.py tests/test_slot_manager_diff.py tests/test_gpu.py \
  tests/test_gpu_runtime.py tests/test_gpu_streams.py
rc=$?
result gpu-native "$(outcome $rc): $(tail -1 "$OUT/tests_native.log")"

# -- 5. bandwidth ---------------------------------------------------------------------------------------
started bandwidth
SCRATCH="$(mktemp -d)"
run_for 60 "$OUT/bandwidth.log" "$VPY" benchmarks/copy_bandwidth.py --out "$SCRATCH"
rc=$?
cp "$SCRATCH/bandwidth.json" "$OUT/" 2>/dev/null
[ -f "$SCRATCH/bandwidth.md" ] && cat "$SCRATCH/bandwidth.md" >>"$OUT/bandwidth.log"
result bandwidth "$(outcome $rc) (see bandwidth.log)"

# -- 5b. prefill -----------------------------------------------------------------------------------------
# The source tree with the torch copy engine (demand loads on their own stream); the real link, so the limit
# column is the original forward alone.
started prefill
M2R2_MOE_NATIVE_CUDA=0 PYTHONPATH="$PWD" run_for 60 "$OUT/prefill.log" "$VPY" tools/profile_prefetch.py --device cuda \
  --prefill 256,1024 --link-ratios 1 --repeats 3 --new-tokens 8 --json "$OUT/prefill.json"
rc=$?
result prefill "$(outcome $rc) (see prefill.log, prefill.json)"

# -- 5c. expand: compressed experts on the copy stream ---------------------------------------------------
started expand
PYTHONPATH="$PWD" run_for 60 "$OUT/tests_expand.log" "$VPY" -m pytest -q -rs -p no:cacheprovider -m gpu \
  tests/test_expansion.py
rc=$?
result expand-tests "$(outcome $rc): $(tail -1 "$OUT/tests_expand.log")"
PYTHONPATH="$PWD" run_for 45 "$OUT/expand.log" "$VPY" benchmarks/gpu_expand.py --json "$OUT/expand.json"
rc=$?
result expand "$(outcome $rc) (see expand.log, expand.json)"

# -- 6. replay ------------------------------------------------------------------------------------------
# 4 MoE layers x 8 experts x 352 MB bf16: the model is made on the GPU (11.5 GB), decoded with every expert
# resident, moved to host memory and offloaded once (11.3 GB pinned host store, 16 device slots = 5.6 GB);
# then none / history / gate / m2r2 / oracle / none again. gpu_replay.py skips the predictors whose run
# would end past its --budget-s and writes replay.json after every run. The source tree is imported (with
# the installed compiled parts, where the build succeeded); the default copy engine (the torch twin) is timed.
started replay
REPLAY_S=$(( $(left) > 240 ? 240 : $(left) ))
if [ "$REPLAY_S" -lt 60 ]; then
  result replay "skipped: ${REPLAY_S} s left of ${SCRIPT_S} s"
else
  { free -g || true; timeout 20 nvidia-smi --query-gpu=memory.used,memory.total --format=csv || true; } >"$OUT/replay.log" 2>&1
  M2R2_MOE_NATIVE_CUDA=0 PYTHONPATH="$PWD" run_for "$REPLAY_S" "$OUT/replay.log" "$VPY" benchmarks/gpu_replay.py \
    --json "$OUT/replay.json" --budget-s $(( REPLAY_S - 20 ))
  rc=$?
  result replay "$(outcome $rc) within ${REPLAY_S} s (see replay.log, replay.json)"
  sed -n '/^| predictor |/,$p' "$OUT/replay.log"
fi
exit 0

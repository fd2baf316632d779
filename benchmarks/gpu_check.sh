#!/usr/bin/env bash
# One prepared check for a lent GPU machine (no network; python3 with torch+CUDA, transformers, pybind11,
# scikit-build-core, cmake, ninja and nvcc already installed). From the repository root:
#
#     OUT=/some/dir bash benchmarks/gpu_check.sh        # OUT defaults to /tmp/m2r2_gpu_check
#
# 1. builds and installs the package with the CUDA copy engine required (M2R2_MOE_CUDA=ON) into a venv
#    that sees the system packages (pip --no-build-isolation --no-deps: nothing is downloaded); if that
#    fails, once more with M2R2_MOE_CUDA=AUTO, so the C++ part is still checked;
# 2. runs the native-core tests and the gpu-marked tests, requiring both native parts;
# 3. measures the copy engines' host→device bandwidth against one plain large pinned copy_;
# 4. times offloaded decoding per predictor on Mixtral-8x7B expert geometry (4 MoE layers, synthetic
#    weights, the built-in model's routing and predictor scores replayed: benchmarks/gpu_replay.py).
# Each step runs even when an earlier one failed; the whole script is meant to end within ~8 minutes.
# Files in $OUT (at most 8, flat): build.log (the environment first), tests.log, bandwidth.log (with the
# bandwidth table), bandwidth.json, replay.log (with the replay table), replay.json, summary.txt,
# trace.log (this script's set -x).
set -u -o pipefail
OUT="${OUT:-/tmp/m2r2_gpu_check}"
mkdir -p "$OUT"
exec 3>"$OUT/trace.log"
BASH_XTRACEFD=3
set -x
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
VENV="${VENV:-/tmp/m2r2-gpu-venv}"
status() { echo "$1: $2" | tee -a "$OUT/summary.txt"; }
: > "$OUT/summary.txt"

{
  date -u; uname -a; nvidia-smi || true; nvcc --version || true; cmake --version || true
  "$PY" -c "import sys, torch; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')" || true
  "$PY" -m pip list 2>/dev/null | grep -i -E "^(torch|transformers|pybind11|scikit-build-core|cmake|ninja|hypothesis|pytest|safetensors) " || true
} > "$OUT/build.log" 2>&1
echo "=== environment above, build below ===" >>"$OUT/build.log"

# -- 1. build -----------------------------------------------------------------------------------
# A venv that sees the interpreter's packages; where it does not (python3 itself a venv), the
# interpreter itself (the machine is bare and handed back afterwards).
VPY="$PY"; PIP_EXTRA=""
if "$PY" -m venv --system-site-packages "$VENV" >>"$OUT/build.log" 2>&1 &&
   "$VENV/bin/python" -c "import torch, scikit_build_core, pybind11" >>"$OUT/build.log" 2>&1; then
  VPY="$VENV/bin/python"
elif "$PY" -m pip install --help 2>/dev/null | grep -q -- --break-system-packages; then
  PIP_EXTRA="--break-system-packages"
fi
echo "installing with $VPY $PIP_EXTRA" >>"$OUT/build.log"
build() {  # $1 = M2R2_MOE_CUDA mode
  echo "=== pip install, M2R2_MOE_CUDA=$1 ===" >>"$OUT/build.log"
  local t0=$SECONDS
  M2R2_MOE_CUDA="$1" "$VPY" -m pip install -v --no-build-isolation --no-deps --no-index $PIP_EXTRA . \
    >>"$OUT/build.log" 2>&1
  local rc=$?
  echo "=== rc=$rc in $((SECONDS - t0)) s ===" >>"$OUT/build.log"
  return $rc
}
if build ON; then
  status build "ok with the CUDA part required"
elif build AUTO; then
  status build "FAILED with M2R2_MOE_CUDA=ON; ok with AUTO (see build.log)"
else
  status build "FAILED (see build.log)"
fi
# Outside the repository, so that the installed copy (not the source tree) is imported.
(cd /tmp && "$VPY" -c "import m2r2_moe._ext as e, json; print(json.dumps(e.summary())); print('cuda_probe:', repr(e.cuda_probe()))") \
  >>"$OUT/build.log" 2>&1
status ext "$(cd /tmp && "$VPY" -c "import m2r2_moe._ext as e; print('HAS_EXT', e.HAS_EXT, 'HAS_CUDA_EXT', e.HAS_CUDA_EXT, 'probe', repr(e.cuda_probe()))" 2>&1 | tail -1)"

# -- 2. tests -----------------------------------------------------------------------------------
# M2R2_MOE_NATIVE_CUDA=1: offloaded models use the native engine (the default is its torch twin until this passes)
export M2R2_MOE_REQUIRE_EXT=1 M2R2_MOE_REQUIRE_CUDA_EXT=1 M2R2_MOE_NATIVE_CUDA=1 PYTHONUNBUFFERED=1
timeout 420 "$VPY" -m pytest -q -rs -p no:cacheprovider tests/test_ext.py tests/test_slot_manager_diff.py tests/test_gpu.py \
  >"$OUT/tests.log" 2>&1
status tests "rc=$? ($(tail -1 "$OUT/tests.log"))"

# -- 3. bandwidth -------------------------------------------------------------------------------
# bandwidth.md goes to a scratch folder (its text is in bandwidth.log too): $OUT keeps to 8 files
SCRATCH="$(mktemp -d)"
timeout 240 "$VPY" benchmarks/copy_bandwidth.py --out "$SCRATCH" >"$OUT/bandwidth.log" 2>&1
status bandwidth "rc=$? (see bandwidth.log)"
cp "$SCRATCH/bandwidth.json" "$OUT/" 2>/dev/null

# -- 4. offloaded decode on Mixtral-8x7B expert geometry, the built-in model's routing replayed ---------
# 4 MoE layers x 8 experts x 352 MB bf16: the model is made on the GPU (11.5 GB), decoded with every
# expert resident, moved to host memory and offloaded once (11.3 GB pinned host store, 16 device slots
# = 5.6 GB); then none / history / gate / m2r2 / oracle / none again, 64-token prompt + 48 decode steps
# each. Expected to take about a minute (not yet run on a GPU). Its time limit is what is left of
# ~8 minutes (120-240 s); it skips the predictors that would end past that and writes replay.json after
# every run. The source tree is imported (with the installed compiled parts, where the build
# succeeded) and the default copy engine (the torch twin) is timed.
left=$(( 470 - SECONDS ))
REPLAY_S=$(( left > 240 ? 240 : (left < 120 ? 120 : left) ))
{ free -g || true; nvidia-smi --query-gpu=memory.used,memory.total --format=csv || true; } >"$OUT/replay.log" 2>&1
M2R2_MOE_NATIVE_CUDA=0 PYTHONPATH="$PWD" timeout -k 10 "$REPLAY_S" "$VPY" benchmarks/gpu_replay.py \
  --json "$OUT/replay.json" --budget-s $(( REPLAY_S - 20 )) >>"$OUT/replay.log" 2>&1
status replay "rc=$? in $SECONDS s of the script, limit ${REPLAY_S} s (see replay.log, replay.json)"

set +x
[ -f "$SCRATCH/bandwidth.md" ] && cat "$SCRATCH/bandwidth.md"
sed -n '/^| predictor |/,$p' "$OUT/replay.log"
exit 0

#!/usr/bin/env bash
# make gpu-check: everything that needs a GPU, as one call of at most 8 minutes on an H100/H200.
#
#   1. the GPU tests (tests/test_gpu.py, and the kernel and product tests running natively);
#   2. benchmarks/gpu_kernels.py: WAN 480p self and cross, Flux, SD and SDXL against SDPA-flash and
#      SDPA-cuDNN in the same run, the hybrid maps_from_lse path, the issue-14 targets;
#   3. benchmarks/e2e_wan.py: the WAN 2.1 14B-shaped step at 4 layers (needs diffusers: where the
#      python lacks it, `make gpu-wheels` here and carry .whl/ there; installed to /tmp, offline);
#   4. with the time left, benchmarks/gpu_kernels.py --sweep (launch-config candidates).
# Each stage has its own time limit, so a slow or failing stage cannot take the others' time.
# Results: RESULTS.md sections (device, date, versions, ratios). With $OUT set (the device
# machine), RESULTS.md, the JSON rows and one log go to $OUT (copy RESULTS.md back into
# benchmarks/); otherwise benchmarks/RESULTS.md is updated in place and logs go to results/.
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
BUDGET_S=${GPU_CHECK_BUDGET_S:-470}
if [ -n "${OUT:-}" ]; then
    DEST=$OUT; RESULTS=$OUT/RESULTS.md; cp benchmarks/RESULTS.md "$RESULTS"
else
    DEST=$ROOT/results/gpu-check; RESULTS=$ROOT/benchmarks/RESULTS.md; mkdir -p "$DEST"
fi
LOG=$DEST/gpu-check.log
export PYTHONUNBUFFERED=1
start=$SECONDS
failed=0

if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/attncap-site .whl/*.whl \
        && export PYTHONPATH=/tmp/attncap-site${PYTHONPATH:+:$PYTHONPATH}
fi
$PY -m pip install -q --no-index --no-deps --no-build-isolation -e . >>"$LOG" 2>&1 || { echo "pip install -e . failed" | tee -a "$LOG"; exit 1; }
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"; } 2>&1 | tee -a "$LOG"

stage() {  # stage NAME LIMIT_S COMMAND...: run with a time limit, log, remember failures
    local name=$1 limit=$2; shift 2
    echo "== $name (limit ${limit} s, at $((SECONDS - start)) s)" | tee -a "$LOG"
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    local status=${PIPESTATUS[0]}
    echo "== $name: exit $status at $((SECONDS - start)) s" | tee -a "$LOG"
    [ "$status" -eq 0 ] || failed=1
}

stage tests 180 $PY -m pytest -q -p no:cacheprovider -rs tests/test_gpu.py tests/test_kernels.py tests/test_products.py
stage cuda-capture 40 $PY -m pytest -q -p no:cacheprovider -rs tests/test_compile.py -k cuda  # no host sync, CUDA graphs
stage bench 140 $PY benchmarks/gpu_kernels.py --results "$RESULTS" --json "$DEST/gpu-kernels.json"
if $PY -c "import diffusers" 2>/dev/null; then
    stage e2e 90 $PY benchmarks/e2e_wan.py --device cuda --layers 4 --repeats 2 --write-results --results "$RESULTS" \
        --out "$DEST/results-e2e-cuda.json"
else
    echo "== e2e skipped: diffusers is not installed (make gpu-wheels, then carry .whl)" | tee -a "$LOG"; failed=1
fi
left=$((BUDGET_S - (SECONDS - start)))
if [ "$left" -gt 45 ]; then
    stage sweep $((left - 5)) $PY benchmarks/gpu_kernels.py --sweep --results "$RESULTS" --json "$DEST/gpu-sweep.json"
else
    echo "== sweep skipped: ${left} s left of the ${BUDGET_S} s budget" | tee -a "$LOG"
fi
echo "== gpu-check done in $((SECONDS - start)) s, $([ $failed -eq 0 ] && echo 'every stage passed' || echo 'a stage FAILED')" | tee -a "$LOG"
exit $failed

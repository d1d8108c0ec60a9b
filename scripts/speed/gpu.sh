#!/usr/bin/env bash
# Everything a GPU should check, in one go: (0) the test suite, its CUDA tests running instead of skipping, and the
# demo grid (configs/demo.toml) from scratch on CUDA, timed; then attack speed: the pytest-benchmark benchmarks of
# tests/speed (each attack's time per backward pass over the floor, one forward + backward pass w.r.t. the input,
# measured in the same rounds) at
#   1. the demo grid, 48x56x48, batch 8, cnn3d and hybrid_e2e,
#   2. the paper's full grid, 172x220x156, batch 2, cnn3d,
# each in fp32 and in bf16 (torch.autocast, as `precision = "bf16"` in a run config). Writes into OUT_DIR:
# device.txt, pytest.txt, demo.txt, shared-passes.md (the demo grid with its cells alone and with their clean
# passes shared), one benchmark JSON and one markdown table per run, and results.md with every table. SUITE=0
# leaves out step (0).
#
# Usage: scripts/speed/gpu.sh OUT_DIR             on a machine with CUDA and medrobust installed (make venv)
#        scripts/speed/gpu.sh --dry-run OUT_DIR   the same runs on the CPU at a tiny grid, one round: checks that
#                                              the script works end to end (its figures mean nothing)
# PYTHON (default: .venv/bin/python if present, else python3) and ROUNDS (default 10) can be set.
set -euo pipefail
dry=0
if [[ "${1:-}" == "--dry-run" ]]; then
    dry=1
    shift
fi
out=${1:?usage: scripts/speed/gpu.sh [--dry-run] OUT_DIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)  # before leaving the caller's directory
cd "$(dirname "$0")/../.."  # the repository root
if [[ -z "${PYTHON:-}" ]]; then
    PYTHON=python3
    [[ -x .venv/bin/python ]] && PYTHON=.venv/bin/python
fi
# glibc malloc thrashes on large 3D activations without these (docs/benchmarks.md).
export MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=1073741824

if [[ $dry == 1 ]]; then
    device=cpu rounds=1 demo_grid=32x40x32 demo_batch=2 full_grid=32x40x32 full_batch=1
else
    device=cuda rounds=${ROUNDS:-10} demo_grid=48x56x48 demo_batch=8 full_grid=172x220x156 full_batch=2
fi
"$PYTHON" - "$device" <<'PY' | tee "$out/device.txt"
import sys

import torch

device = sys.argv[1]
if device == "cuda" and not torch.cuda.is_available():
    sys.exit("scripts/speed/gpu.sh: no CUDA device is visible to torch; use --dry-run for a check on the CPU")
name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu (dry run: figures mean nothing)"
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, {name}")
PY

status=0
if [[ $dry == 0 && "${SUITE:-1}" == 1 ]]; then
    # The packaging test builds venvs and has nothing to do with the GPU.
    "$PYTHON" -m pytest -q -p no:cacheprovider tests --ignore=tests/test_packaging.py -rs 2>&1 | tail -40 \
        | tee "$out/pytest.txt" || status=1
    demo=$(mktemp -d)
    sed "s#runs/demo#$demo#g" configs/demo.toml > "$demo/demo.toml"
    SECONDS=0
    "$PYTHON" -m medrobust.cli run "$demo/demo.toml" --quiet 2>&1 | tail -45 > "$out/demo.txt" || status=1
    echo "demo wall time: ${SECONDS} s" | tee -a "$out/demo.txt"
    # The same grid with every cell alone and with the clean passes shared, side by side (rows compared bit for bit).
    "$PYTHON" scripts/speed/shared_passes.py --config "$demo/demo.toml" --out "$demo/shared" \
        --json "$out/shared-passes.json" 2>&1 | tee "$out/shared-passes.md" || status=1
fi
: > "$out/results.md"
run() {  # run NAME GRID BATCH MODELS PRECISION [ATTACKS]
    local name=$1
    echo "== $name: grid $2, batch $3, $4, $5${6:+, $6}" | tee -a "$out/results.md"
    MEDROBUST_BENCH_DEVICE=$device MEDROBUST_BENCH_GRID=$2 MEDROBUST_BENCH_BATCH=$3 MEDROBUST_BENCH_MODELS=$4 \
    MEDROBUST_BENCH_PRECISION=$5 MEDROBUST_BENCH_ATTACKS=${6:-} \
    MEDROBUST_BENCH_ROUNDS=$rounds MEDROBUST_BENCH_TABLE="$out/$name.md" \
        "$PYTHON" -m pytest -q -p no:cacheprovider tests/speed --benchmark-only \
        --benchmark-json="$out/$name.json" > "$out/$name.log" 2>&1 || {
            echo "   failed: see $out/$name.log" | tee -a "$out/results.md"; tail -20 "$out/$name.log"; return 1; }
    cat "$out/$name.md" >> "$out/results.md"
    echo >> "$out/results.md"
}
for precision in fp32 bf16; do
    run "demo-$precision" "$demo_grid" "$demo_batch" cnn3d,hybrid_e2e "$precision" || status=1
    run "full-$precision" "$full_grid" "$full_batch" cnn3d "$precision" || status=1
done
# Carlini-Wagner's per-sample throughput at batch 8 against batch 1 (the target is at least 4 times).
run "demo-cw-batch1" "$demo_grid" 1 cnn3d fp32 cw || status=1
"$PYTHON" - "$out/demo-fp32.json" "$out/demo-cw-batch1.json" "$demo_batch" <<'PY' | tee -a "$out/results.md" || status=1
import json
import sys


def cw_call_ms(path):
    for bench in json.load(open(path))["benchmarks"]:
        info = bench["extra_info"]
        if info.get("model") == "cnn3d" and str(info.get("attack", "")).startswith("cw"):
            return info["call_ms"]
    sys.exit(f"no cw benchmark in {path}")


batched, single, batch = cw_call_ms(sys.argv[1]), cw_call_ms(sys.argv[2]), int(sys.argv[3])
print(f"cw per-sample throughput, batch {batch} against batch 1: {(batch / batched) / (1 / single):.2f} times "
      f"({batched:.1f} ms per call at batch {batch}, {single:.1f} ms at batch 1)")
PY
cat "$out/results.md"
exit $status

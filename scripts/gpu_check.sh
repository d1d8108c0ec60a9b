#!/usr/bin/env bash
# GPU checks in one go, for a machine with CUDA and medrobust installed:
#   1. the test suite (its CUDA tests run instead of skipping; the runner end-to-end test runs on CUDA),
#   2. the demo grid (configs/demo.toml) from scratch on CUDA, timed,
#   3. the attack-cost benchmark at the demo grid.
# Usage: scripts/gpu_check.sh RESULTS_DIR
set -uo pipefail
results=${1:?usage: scripts/gpu_check.sh RESULTS_DIR}
mkdir -p "$results"
python3 - <<'PY' | tee "$results/device.txt"
import torch
print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))
PY
# The packaging test builds venvs from the network; it has nothing to do with the GPU.
python3 -m pytest -q -p no:cacheprovider tests --ignore=tests/test_packaging.py -rs 2>&1 | tail -40 | tee "$results/pytest.txt"
demo=$(mktemp -d)
sed "s#runs/demo#$demo#g" configs/demo.toml > "$demo/demo.toml"
SECONDS=0
python3 -m medrobust.cli run "$demo/demo.toml" --quiet 2>&1 | tail -45 > "$results/demo.txt"
echo "demo wall time: ${SECONDS} s" | tee -a "$results/demo.txt"
cp "$demo/results.csv" "$demo/leaderboard.html" "$results/" 2>/dev/null
python3 scripts/bench_attacks.py --device cuda --batch 8 --rounds 10 --json "$results/bench_attacks.json" \
    2>&1 | tee "$results/bench_attacks.txt"

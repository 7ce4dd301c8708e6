#!/usr/bin/env bash
# Scratch (device): host-time table for replayed plain calls, then the whole GPU test suite
# (4 xdist workers; pytest-xdist and execnet carried in .whl beside diffusers). Logs in $OUT.
set -u
OUT=${OUT:-./out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,temperature.gpu --format=csv
timeout 120 python3 scratch/host_replay_gpu.py 2>&1 | tee "$OUT/host_replay.log"
timeout -s INT -k 15 ${TEST_CAP:-420} python3 -m pytest -m cuda tests -q -p no:cacheprovider -n ${WORKERS:-4} \
  ${TEST_K:+-k "$TEST_K"} > "$OUT/gpu_tests.log" 2>&1
echo "pytest exit $?"
grep -E "^(FAILED|ERROR)" "$OUT/gpu_tests.log" | head -30
tail -n 3 "$OUT/gpu_tests.log"

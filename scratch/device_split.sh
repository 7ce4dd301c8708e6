#!/usr/bin/env bash
# Scratch (device): GPU tests of the Hopper kernel (key split included) and the replay, then
# the key-split A/B table. Logs in $OUT.
set -u
OUT=${OUT:-./out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
timeout 300 python3 -m pytest -m cuda tests/test_hopper_fwd.py tests/test_gpu.py -q -p no:cacheprovider -n 4 \
  > "$OUT/gpu_tests.log" 2>&1
echo "pytest exit $?"; grep -E "^(FAILED|ERROR)" "$OUT/gpu_tests.log" | head -20; tail -n 2 "$OUT/gpu_tests.log"
timeout 200 python3 scratch/key_split_ab.py 2>&1 | tee "$OUT/key_split_ab.log" | grep -v Warning

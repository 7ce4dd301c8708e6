#!/usr/bin/env bash
# Scratch (device): overlapped pair statistics (scratch/pair_overlap_ab.py), then the pair and
# Hopper GPU tests; logs in $OUT.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD:$PWD/scratch PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm --format=csv,noheader
timeout ${AB_CAP:-200} python3 scratch/pair_overlap_ab.py 2>&1 | grep -v Warn | tee $OUT/ab.log
timeout -s INT -k 15 ${TEST_CAP:-200} python3 -m pytest -m cuda tests -q -p no:cacheprovider -n 4 ${TEST_K:+-k "$TEST_K"} > $OUT/gpu_tests.log 2>&1
echo "pytest exit $?"; grep -E "^(FAILED|ERROR)" $OUT/gpu_tests.log | head -30; tail -n 3 $OUT/gpu_tests.log

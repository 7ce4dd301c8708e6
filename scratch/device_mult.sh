#!/usr/bin/env bash
# Scratch (device): the staged-multiplier A/B (scratch/mult_staged_ab.py, needs the patch applied, see
# there) and the Hopper GPU tests; logs in $OUT.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD:$PWD/scratch PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm --format=csv,noheader
timeout 150 python3 scratch/mult_staged_ab.py flux_1024,flux_edit 2>&1 | grep -v Warn | tee $OUT/ab.log
timeout -s INT 280 python3 -m pytest -m cuda tests/test_hopper_fwd.py tests/test_gpu.py -q -p no:cacheprovider -n 4 ${TEST_K:+-k "$TEST_K"} > $OUT/gpu_tests.log 2>&1
echo "pytest exit $?"; grep -E "^(FAILED|ERROR)" $OUT/gpu_tests.log | head; tail -n 3 $OUT/gpu_tests.log

#!/usr/bin/env bash
# Scratch (device): NOTES.md 72's A/B (scratch/mult_offset_ab.py), then the multiplier GPU tests; logs in $OUT.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD:$PWD/scratch PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm --format=csv,noheader
timeout 240 python3 scratch/mult_offset_ab.py flux_1024,flux_edit,sd3_1024 2>&1 | grep -v Warn | tee $OUT/ab.log
timeout -s INT 240 python3 -m pytest -m cuda tests/test_hopper_fwd.py tests/test_gpu.py tests/test_edit_headrouter.py -q -p no:cacheprovider -n 4 -k "multiplier or offset or dtr or headrouter" > $OUT/gpu_tests.log 2>&1
echo "pytest exit $?"; grep -E "^(FAILED|ERROR)" $OUT/gpu_tests.log | head; tail -n 3 $OUT/gpu_tests.log

#!/bin/bash
# Device run (session 31, last): the one-stage key-group route and unit-length GPU tests, and the head-dim-64
# one-stage call that read out of bounds, under compute-sanitizer.
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl > /dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD
(PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 120 /usr/local/cuda/bin/compute-sanitizer --tool memcheck --print-limit 2 \
  python3 scratch/s31_case.py vpkp_nk200_stages1_d64 > /tmp/san.log 2>&1; \
  echo "sanitizer d64 one stage: $(grep -m1 RESULT /tmp/san.log) | $(grep -m1 'ERROR SUMMARY' /tmp/san.log)") &
timeout -s INT 130 python3 -m pytest -m cuda -q -p no:cacheprovider -n 4 tests/test_fused_probe.py tests/test_unit_lengths.py \
  -k "one_stage or unit_lengths" 2>&1 | grep -E "^(FAILED|ERROR)|^E  .*Error|passed|failed" | cut -c1-250 | tail -12
wait

#!/usr/bin/env bash
# Scratch (device): persistent-kernel A/B, then the Hopper tests.
set -u
OUT=${OUT:-./out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD:$PWD/scratch PYTHONUNBUFFERED=1
timeout 200 python3 scratch/persistent_ab.py ${AB_SHAPES:-flux_1024,flux_edit,flux_512,flux_256,flux_1024_b2} 2>&1 | tee "$OUT/ab.log"
timeout -s INT -k 15 ${TEST_CAP:-240} python3 -m pytest -m cuda ${TEST_FILES:-tests/test_hopper_fwd.py} -q -x -p no:cacheprovider \
  -n ${WORKERS:-4} > "$OUT/gpu_tests.log" 2>&1
echo "pytest exit $?"
grep -E "^(FAILED|ERROR)|Error" "$OUT/gpu_tests.log" | head -20
tail -n 2 "$OUT/gpu_tests.log"

#!/usr/bin/env bash
# Scratch (device): the Hopper-kernel tests (tags first), then the tags A/B.
set -u
OUT=${OUT:-./out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD:$PWD/scratch PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,temperature.gpu --format=csv
timeout -s INT -k 15 ${TEST_CAP:-300} python3 -m pytest -m cuda ${TEST_FILES:-tests/test_hopper_fwd.py} -q -x -p no:cacheprovider \
  -n ${WORKERS:-4} ${TEST_K:+-k "$TEST_K"} > "$OUT/gpu_tests.log" 2>&1
echo "pytest exit $?"
grep -E "^(FAILED|ERROR)|Error|assert" "$OUT/gpu_tests.log" | head -30
tail -n 3 "$OUT/gpu_tests.log"
if [ "${SKIP_AB:-0}" = "0" ]; then timeout 240 python3 scratch/hopper_tags_ab.py ${AB_SHAPES:-flux_1024,flux_edit} 2>&1 | grep -v round | tee "$OUT/ab.log"; fi

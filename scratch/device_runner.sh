#!/usr/bin/env bash
# Scratch (device): the GPU tests of replayed calls, then runner step times (issue 4 table),
# at 1024^2 and 512^2, the latter with and without the replay. Logs in $OUT.
set -u
OUT=${OUT:-./out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
timeout 200 python3 -m pytest -m cuda tests/test_gpu.py tests/test_hopper_fwd.py -q -p no:cacheprovider -n 4 \
  -k "replay or repeat or matches_reference or strided" 2>&1 | tail -n 4
for res in 1024 512; do
  echo "== runner ${res}^2 (replay on)"
  timeout 150 python3 -m iidkern.mmdit.benchmark --probe --iters 30 --resolution $res 2>&1 | tail -n 8
done
echo "== runner 512^2, IIDKERN_REPLAY=0"
IIDKERN_REPLAY=0 timeout 150 python3 -m iidkern.mmdit.benchmark --iters 30 --resolution 512 2>&1 | tail -n 6

#!/bin/bash
# Device run: scratch/replay_s31.py plain, then under compute-sanitizer (each tensor its own allocation).
export PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl > /dev/null 2>&1
mkdir -p $OUT
export PYTHONPATH=/tmp/site:$PWD
S=$(date +%s)
CUDA_LAUNCH_BLOCKING=1 timeout 150 python3 scratch/replay_s31.py cuda > $OUT/plain.log 2>&1
grep -E "FAIL|failures" $OUT/plain.log | cut -c1-400 | head; echo "plain: $(( $(date +%s) - S )) s, $(grep -c '^ok' $OUT/plain.log) ok"
S=$(date +%s)
PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout ${SAN_LIMIT:-300} /usr/local/cuda/bin/compute-sanitizer --tool memcheck \
  --print-limit 4 python3 scratch/replay_s31.py cuda ${SAN_ARGS} > $OUT/sanitizer.log 2>&1
grep -E "=== (Invalid|  +at|  +by|  +Access|ERROR SUMMARY)|FAIL|failures" $OUT/sanitizer.log | cut -c1-300 | head -30
echo "sanitizer: $(( $(date +%s) - S )) s, $(grep -c '^ok' $OUT/sanitizer.log) ok"

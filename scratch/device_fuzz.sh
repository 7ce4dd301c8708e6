#!/bin/bash
# Device run: targeted GPU tests (TARGETS; only those marked cuda), then the every-extra fuzz against the float64
# oracle on the GPU (SEEDS in parallel, each call logged and saved first; with
# CUDA_LAUNCH_BLOCKING=1 a faulting call stops its run and stays in /tmp/callsS.log.last.pt,
# which then runs once more under compute-sanitizer).
export PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl > /dev/null 2>&1
mkdir -p $OUT
if [ -n "$TARGETS" ]; then
  PYTHONPATH=/tmp/site:$PWD timeout -s INT ${TARGET_LIMIT:-200} python3 -m pytest -q -p no:cacheprovider -n 4 -m cuda $TARGETS 2>&1 \
    | grep -E "^E  |passed|failed" | head -20
fi
START=$(date +%s)
for s in ${SEEDS:-1 2 3 4}; do
  CUDA_LAUNCH_BLOCKING=${BLOCKING:-1} IIDKERN_FUZZ_LOG=/tmp/calls$s.log IIDKERN_FUZZ_EXAMPLES=${EXAMPLES:-120} \
    PYTHONPATH=/tmp/site:$PWD timeout -s INT ${LIMIT:-420} python3 -m pytest -q -x -p no:cacheprovider \
    tests/test_attention_fuzz_extras.py -k cuda --hypothesis-seed=$s > /tmp/fuzz$s.log 2>&1 &
done
wait
FAULT=""
for s in ${SEEDS:-1 2 3 4}; do
  echo "== seed $s: $(wc -l < /tmp/calls$s.log) calls"
  grep -E "passed|failed|^E  .*Error|CUDA fault" /tmp/fuzz$s.log | tail -3 | cut -c1-300
  grep -q "CUDA fault" /tmp/fuzz$s.log && { FAULT=/tmp/calls$s.log.last.pt; tail -n 1 /tmp/calls$s.log | cut -c1-900; }
  grep -q "Falsifying" /tmp/fuzz$s.log && grep -A3 "^E  .*Error" /tmp/fuzz$s.log | head -4
done
echo "fuzz: $(( $(date +%s) - START )) s"
if [ -n "$FAULT" ]; then
  echo "== compute-sanitizer on $FAULT"
  PYTHONPATH=/tmp/site:$PWD timeout 150 /usr/local/cuda/bin/compute-sanitizer --tool memcheck --print-limit 2 \
    python3 scratch/replay_fuzz_call.py $FAULT 2>&1 | grep -E "=== (Invalid|  +at|  +by|  +Access)|^ok|Error" | head -12
  cp $FAULT $OUT/
fi
cp /tmp/fuzz*.log $OUT/ 2>/dev/null
for s in ${SEEDS:-1 2 3 4}; do tail -n 40 /tmp/calls$s.log > $OUT/calls$s.tail.log; done

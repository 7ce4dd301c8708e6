#!/bin/bash
# Device run: targeted GPU tests (TARGETS), then the every-extra fuzz against the float64
# oracle on the GPU (4 seeds in parallel, each call logged first; CUDA_LAUNCH_BLOCKING=1 so
# a faulting call is the last line of its log).
export PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl > /dev/null 2>&1
mkdir -p $OUT
if [ -n "$TARGETS" ]; then
  PYTHONPATH=/tmp/site:$PWD timeout 200 python3 -m pytest -q -p no:cacheprovider -n 4 $TARGETS 2>&1 | tail -8
fi
START=$(date +%s)
for s in ${SEEDS:-1 2 3 4}; do
  CUDA_LAUNCH_BLOCKING=${BLOCKING:-1} IIDKERN_FUZZ_LOG=/tmp/calls$s.log IIDKERN_FUZZ_EXAMPLES=${EXAMPLES:-120} \
    PYTHONPATH=/tmp/site:$PWD timeout ${LIMIT:-420} python3 -m pytest -q -x -p no:cacheprovider \
    tests/test_attention_fuzz_extras.py -k cuda --hypothesis-seed=$s > /tmp/fuzz$s.log 2>&1 &
done
wait
for s in ${SEEDS:-1 2 3 4}; do
  echo "== seed $s: $(wc -l < /tmp/calls$s.log) calls"; grep -E "passed|failed|Error:|error:" /tmp/fuzz$s.log | tail -3
  grep -q "passed" /tmp/fuzz$s.log || { echo "last calls:"; tail -n 2 /tmp/calls$s.log | cut -c1-900; }
done
cp /tmp/fuzz*.log /tmp/calls*.log $OUT/ 2>/dev/null
echo "fuzz: $(( $(date +%s) - START )) s"

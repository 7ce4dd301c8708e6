#!/bin/bash
# Device run (one GPU): the whole GPU suite with CUDA_LAUNCH_BLOCKING=1 (a faulting launch raises in its own
# test), verbose (per-test results with the worker), the fuzz's calls logged (IIDKERN_FUZZ_LOG: a faulting fuzz
# call is saved whole); a saved faulting call runs again under compute-sanitizer.
export PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl > /dev/null 2>&1
mkdir -p $OUT
START=$(date +%s)
CUDA_LAUNCH_BLOCKING=1 IIDKERN_FUZZ_LOG=/tmp/calls_suite.log IIDKERN_FUZZ_EXAMPLES=${FUZZ_EXAMPLES:-60} \
  PYTHONPATH=/tmp/site:$PWD:$PWD/scratch timeout -s INT ${SUITE_LIMIT:-420} \
  python3 -m pytest -m cuda tests -v -p no:cacheprovider -n 4 -rf ${PYTEST_ARGS} > /tmp/suite.log 2>&1
grep -E "^(FAILED|ERROR)|^E  .*Error|passed|failed|crashed|CUDA fault" /tmp/suite.log | cut -c1-300 | tail -25
echo "suite: $(( $(date +%s) - START )) s; fuzz calls logged: $(cat /tmp/calls_suite.log* 2>/dev/null | wc -l)"
cp /tmp/suite.log $OUT/
[ -f /tmp/calls_suite.log ] && tail -n 30 /tmp/calls_suite.log > $OUT/calls_suite.tail.log
if grep -q "CUDA fault" /tmp/suite.log; then
  cp /tmp/calls_suite.log.last.pt $OUT/ 2>/dev/null
  PYTHONPATH=/tmp/site:$PWD timeout 120 /usr/local/cuda/bin/compute-sanitizer --tool memcheck --print-limit 2 \
    python3 scratch/replay_fuzz_call.py /tmp/calls_suite.log.last.pt 2>&1 | grep -E "=== (Invalid|  +at|  +by|  +Access)|^ok|Error" | head -12
fi

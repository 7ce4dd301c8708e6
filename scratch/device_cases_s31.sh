#!/bin/bash
# Device run: each case of scratch/s31_case.py in its own process under compute-sanitizer (memcheck, each
# tensor its own allocation), PAR at a time; one line per case.
export PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl > /dev/null 2>&1
mkdir -p $OUT /tmp/cases
export PYTHONPATH=/tmp/site:$PWD
S=$(date +%s)
CASES=${CASES:-$(python3 scratch/s31_case.py --list)}
run_case() {
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout ${CASE_LIMIT:-200} /usr/local/cuda/bin/compute-sanitizer --tool memcheck \
    --print-limit 2 python3 scratch/s31_case.py $1 > /tmp/cases/$1.log 2>&1
  echo "$1: $(grep -m1 RESULT /tmp/cases/$1.log | cut -c1-150) | $(grep -m1 'ERROR SUMMARY' /tmp/cases/$1.log) | $(grep -m1 -A1 '=== Invalid' /tmp/cases/$1.log | tr '\n' ' ' | cut -c1-120)"
}
export -f run_case
# one case first: it fills the Triton cache for the common specialization
set -- $CASES
run_case $1
shift
printf "%s\n" "$@" | xargs -P ${PAR:-6} -I{} bash -c 'run_case {}'
echo "cases: $(( $(date +%s) - S )) s"
tar czf $OUT/cases.tgz -C /tmp cases

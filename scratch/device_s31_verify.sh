#!/bin/bash
# Device run (session 31): scratch/s31_case.py's second set under compute-sanitizer, then the whole GPU suite.
export PYTHONUNBUFFERED=1
S=$(date +%s)
CASE_LIMIT=150 PAR=6 bash scratch/device_cases_s31.sh 2>&1 | grep -v "^GPU"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl > /dev/null 2>&1
IIDKERN_FUZZ_EXAMPLES=${FUZZ_EXAMPLES:-40} PYTHONPATH=/tmp/site:$PWD:$PWD/scratch timeout -s INT ${SUITE_LIMIT:-380} \
  python3 -m pytest -m cuda tests -q -p no:cacheprovider -n 4 -rf > /tmp/suite.log 2>&1
grep -E "^(FAILED|ERROR)|^E  .*Error|passed|failed" /tmp/suite.log | cut -c1-300 | tail -25
cp /tmp/suite.log $OUT/
echo "total: $(( $(date +%s) - S )) s"

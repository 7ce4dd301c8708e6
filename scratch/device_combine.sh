#!/bin/bash
# Device run (one H100): the split's GPU tests, then scratch/combine_cost.py (NOTES.md 62).
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl > /dev/null 2>&1
PYTHONPATH=/tmp/site:$PWD:$PWD/scratch timeout 200 python3 -m pytest -m cuda tests/test_hopper_fwd.py tests/test_tail_split.py \
  -q -p no:cacheprovider -n 4 -k "split or piece or join" 2>&1 | tail -3
PYTHONPATH=$PWD:$PWD/scratch timeout 330 python3 scratch/combine_cost.py 2>&1 | grep -E "worst|NOT|flux_|Error|error"

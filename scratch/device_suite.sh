#!/bin/bash
# Device run (one H100): the whole GPU suite, then scratch/plan_scan.py (not with SUITE_ONLY=1).
export PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl > /dev/null 2>&1
START=$(date +%s)
PYTHONPATH=/tmp/site:$PWD:$PWD/scratch timeout 330 python3 -m pytest -m cuda tests -q -p no:cacheprovider -n 4 2>&1 | tail -6
echo "suite: $(( $(date +%s) - START )) s"
[ -n "$SUITE_ONLY" ] || PYTHONPATH=$PWD:$PWD/scratch timeout 200 python3 scratch/plan_scan.py 2>&1 | grep -E "flux_|Error|error"

#!/bin/bash
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl > /dev/null 2>&1
PYTHONPATH=/tmp/site:$PWD timeout 120 python3 scratch/dtr_profile.py "route+dtr same" 2>&1 | grep -v -i warn | tail -12
PYTHONPATH=/tmp/site:$PWD timeout 120 python3 scratch/route_host_profile.py 2>&1 | grep -E "^ +[0-9]|ncalls|function calls" | head -24
PYTHONPATH=/tmp/site:$PWD timeout 120 python3 scratch/dtr_same_cost.py 2>&1 | tail -7

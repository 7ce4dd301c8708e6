#!/bin/bash
export PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl > /dev/null 2>&1
PYTHONPATH=/tmp/site:$PWD timeout 200 python3 scratch/dtr_profile.py "$@" 2>&1 | grep -v Warning | tail -60

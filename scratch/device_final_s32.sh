#!/bin/bash
# Session 32's last device run: the head-scaling copy's GPU time (scratch/scale_heads_time.py), then the whole GPU suite.
export PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl > /dev/null 2>&1
PYTHONPATH=/tmp/site:$PWD timeout 90 python3 scratch/scale_heads_time.py 2>&1 | grep -v Warn | tail -4
SUITE_ONLY=1 SUITE_LIMIT=${SUITE_LIMIT:-420} FUZZ_EXAMPLES=${FUZZ_EXAMPLES:-40} bash scratch/device_suite.sh 2>&1 | tail -30

#!/bin/bash
export PYTHONUNBUFFERED=1
nvidia-smi -L
echo "== repro D=40"
PYTHONPATH=$PWD CUDA_LAUNCH_BLOCKING=1 timeout 60 python3 scratch/repro_crash2.py 3 2>&1 | grep -E "ok|Error" | cut -c1-120

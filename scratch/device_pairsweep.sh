#!/usr/bin/env bash
# Scratch (device): scratch/pair_pass_sweep.py (NOTES.md 73); log in $OUT.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD:$PWD/scratch PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm --format=csv,noheader
timeout 500 python3 scratch/${SWEEP:-pair_pass_sweep}.py 2>&1 | grep -v Warn | tee $OUT/sweep.log | tail -25

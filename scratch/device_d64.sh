#!/usr/bin/env bash
# Scratch (device): the D=64 Hopper A/B (scratch/hopper_d64_ab.py).
set -u
OUT=${OUT:-./out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD:$PWD/scratch PYTHONUNBUFFERED=1
timeout 400 python3 scratch/hopper_d64_ab.py ${AB_SHAPES:-sd3_1024,sd3_2048} 2>&1 | grep -v round | tee "$OUT/d64.log"

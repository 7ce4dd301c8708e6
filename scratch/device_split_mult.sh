#!/bin/bash
# Device run (NOTES.md 70): the block multiplier's key loop split in three (new) against the
# per-tile test (HEAD's kernel, saved as scratch/hopper_fwd_old.py before the run; the split is scratch/mult_three_loops.patch), one process each, then the GPU suite.
export PYTHONPATH=$PWD:$PWD/scratch PYTHONUNBUFFERED=1
nvidia-smi -L
cp kernels/hopper_fwd.py /tmp/hopper_new.py
ab() { timeout -k 10 100 python3 scratch/mult_pack_ab.py ${SHAPES:-flux_1024,flux_edit,sd3_1024} 2>&1 | grep -E "plain|Error|error" | sed "s/^/$1 /" | head -4; }
ab new
cp scratch/hopper_fwd_old.py kernels/hopper_fwd.py; ab old
cp /tmp/hopper_new.py kernels/hopper_fwd.py; ab new
[ -n "$AB_ONLY" ] || SUITE_ONLY=1 bash scratch/device_suite.sh

#!/bin/bash
# Device run (one H100): scratch/turn_variant_ab.py per build switch, each in its own process and Triton cache.
export PYTHONPATH=$PWD:$PWD/scratch PYTHONUNBUFFERED=1
nvidia-smi -L
for v in ${VARIANTS:-"0 0" "1 0" "0 1" "0 0" "1 0" "0 1"}; do
  set -- $v
  IIDKERN_Q_REGS=$1 IIDKERN_LATE_RESCALE=$2 TRITON_CACHE_DIR=/tmp/tc_q$1l$2 timeout -k 10 150 \
    python3 scratch/turn_variant_ab.py 2>&1 | grep -E "^q[01]l[01] |Error|error" | head -8
done

#!/bin/bash
# Device run: scratch/mult_pack_ab.py under each packed-multiplier variant (one process each).
export PYTHONPATH=$PWD:$PWD/scratch PYTHONUNBUFFERED=1
nvidia-smi -L
run() { env "$@" timeout -k 10 120 python3 scratch/mult_pack_ab.py ${SHAPES:-flux_1024,sd3_1024} 2>&1 | grep -E "plain|Error|error" | head -6; }
for v in ${VARIANTS:-"IIDKERN_MULT_PACKED=0" "IIDKERN_MULT_PACKED=1 IIDKERN_MULT_PACK_CACHE=1 IIDKERN_MULT_PACK_DTYPE=bf16"}; do
  run $v
done
